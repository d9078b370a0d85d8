-- Bind a reservation to the upstream's call: its id, object and lease. A settled call keeps its
-- status and lease (it is never revived).
-- ARGV: 1 prefix, 2 reservation id, 3 call id, 4 call object (JSON), 5 status answered, 6 lease
-- end, 7 now. Returns {1, live, lease end} once bound, {0} when there is no such reservation,
-- {2, id} when the reservation is bound to another upstream id, {3, reservation} when the upstream
-- id is bound to another reservation (both refusals change nothing; the same bind again is
-- harmless).
local rid = ARGV[2]
local c = call_key(rid)
local cur = redis.call('HMGET', c, 'st', 'live', 'lease', 'cid')
if not cur[2] then return { 0 } end
if cur[4] and cur[4] ~= ARGV[3] then return { 2, cur[4] } end
local owner = redis.call('HGET', k('cids'), ARGV[3])
if owner and owner ~= rid then return { 3, owner } end
local status = cur[1]
if status == 'pending' then status = ARGV[5] end
local live = cur[2] == '1'
local lease = cur[3]
if live then lease = ARGV[6] end
redis.call('HSET', c, 'cid', ARGV[3], 'obj', ARGV[4], 'st', status, 'lease', lease, 'ut', ARGV[7])
redis.call('HSET', k('cids'), ARGV[3], rid)
redis.call('ZADD', k('list'), 0, rid)
if live then
  redis.call('ZADD', k('live'), lease, rid)
  redis.call('ZADD', k('quiet'), ARGV[7], rid)
  return { 1, 1, lease }
end
-- Bound after it was settled (a late answer): its id goes with its record.
forget_later(rid, ARGV[3], tonumber(ARGV[7]))
return { 1, 0, lease }
