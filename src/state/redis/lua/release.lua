-- Forget a reservation the upstream never accepted: free its slot and hold, charge nothing.
-- ARGV: 1 prefix, 2 reservation id. Returns 1 when a live reservation was released.
local rid = ARGV[2]
local c = call_key(rid)
local cur = redis.call('HMGET', c, 'cid', 'live', 'hold')
if not cur[2] or cur[1] then return 0 end
redis.call('DEL', c)
if cur[2] ~= '1' then return 0 end
redis.call('ZREM', k('live'), rid)
redis.call('HINCRBY', k('book'), 'holds', -(tonumber(cur[3]) or 0))
return 1
