-- The account-wide cap: one sorted set of live reservations by lease end, in its own slot.
-- ARGV: 1 'take' (2 now, 3 cap, 4 member, 5 lease end) | 'extend' (2 member, 3 lease end: only
-- ever later) | 'set' (2 member, 3 lease end) | 'free' (2.. members). A member is
-- '<tenant>/<reservation id>'. Lapsed leases are reaped before a take, so a
-- replica that died holding slots frees them at their lease end.
local op = ARGV[1]
if op == 'take' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[4])
  return 1
elseif op == 'extend' then
  -- Only ever later: the account's lease never ends before the tenant's.
  redis.call('ZADD', KEYS[1], 'XX', 'GT', ARGV[3], ARGV[2])
  return 1
elseif op == 'set' then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[2])
  return 1
else
  for i = 2, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
  return 1
end
