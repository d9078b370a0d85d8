-- Forget a reservation the upstream never accepted: free its slot and hold, charge nothing.
-- ARGV: 1 prefix, 2 reservation id. Returns 1 when a live reservation was released, 0 when
-- there is no such call or it no longer holds a slot (its account slot may go), -1 when it is
-- bound to an upstream call (placed: kept, with its slots).
local rid = ARGV[2]
local c = call_key(rid)
local cur = redis.call('HMGET', c, 'cid', 'live', 'hold')
if not cur[2] then return 0 end
if cur[1] then return -1 end
redis.call('DEL', c)
if cur[2] ~= '1' then return 0 end
redis.call('ZREM', k('live'), rid)
redis.call('HINCRBY', k('book'), 'holds', 0 - (tonumber(cur[3]) or 0))
return 1
