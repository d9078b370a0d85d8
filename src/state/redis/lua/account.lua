-- The account-wide cap: the live reservations of every tenant by lease end (KEYS[1]), and those
-- whose tenant step has not answered yet by the time they were taken (KEYS[2]), in their own
-- slot. A member is '<tenant>/<reservation id>'.
-- ARGV: 1 'take' (2 now, 3 cap, 4 member, 5 lease end) | 'confirm' (2.. members) | 'extend'
-- (2 member, 3 lease end: only ever later) | 'set' (2 member, 3 lease end) | 'free' (2.. members).
-- A take counts only unlapsed leases, so a replica that died holding slots frees them at their
-- lease end. It answers 1 (taken), 0 (the cap is reached) or -1 (reached, but some slots are
-- held by admissions still deciding: ask again in a moment).
local op = ARGV[1]
-- An admission decides within this many microseconds, or its replica is gone.
local DECIDING_US = 2000000
if op == 'take' then
  local now = tonumber(ARGV[2])
  -- Run twice (a retried reply): taken the first time.
  if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 1 end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - DECIDING_US)
  if redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[2], '+inf') >= tonumber(ARGV[3]) then
    if redis.call('ZCARD', KEYS[2]) > 0 then return -1 end
    return 0
  end
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[4])
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  return 1
elseif op == 'confirm' then
  for i = 2, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
  return 1
elseif op == 'extend' then
  redis.call('ZADD', KEYS[1], 'XX', 'GT', ARGV[3], ARGV[2])
  return 1
elseif op == 'set' then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[2])
  return 1
else
  for i = 2, #ARGV do
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
  return 1
end
