-- Idempotency keys: 'begin' (ARGV 3 key, 4 body hash, 5 now, 6 expires at, 7 claim id: a
-- retried begin of the same claim proceeds) | 'complete' (3 key,
-- 4 body hash, 5 created at, 6 expires at, 7 status, 8 body, 9 content type) | 'abandon' (3 key)
-- | 'purge' (3 now).
local op = ARGV[2]
local function ikey(key) return k('i:' .. key) end
local function keep(key, expires, created)
  redis.call('ZADD', k('idem'), expires, key)
  -- Purged by the sweeper at its expiry; Redis forgets it a day later in any case.
  redis.call('PEXPIRE', ikey(key), math.max(1, math.floor((expires - created) / 1000)) + 86400000)
end
if op == 'begin' then
  local ik = ikey(ARGV[3])
  local r = redis.call('HMGET', ik, 'bh', 'st', 'status', 'body', 'ct', 'exp')
  local now = tonumber(ARGV[5])
  if r[1] and tonumber(r[6]) > now then
    if r[1] ~= ARGV[4] then return { 'conflict' } end
    if r[2] == 'done' then return { 'replay', r[3], r[4], r[5] } end
    if redis.call('HGET', ik, 'owner') == ARGV[7] then return { 'proceed' } end
    return { 'in_flight' }
  end
  redis.call('DEL', ik)
  redis.call('HSET', ik, 'bh', ARGV[4], 'st', 'in_flight', 'exp', ARGV[6], 'owner', ARGV[7])
  keep(ARGV[3], tonumber(ARGV[6]), now)
  return { 'proceed' }
elseif op == 'complete' then
  local ik = ikey(ARGV[3])
  if redis.call('EXISTS', ik) == 0 then
    redis.call('HSET', ik, 'bh', ARGV[4], 'exp', ARGV[6])
    keep(ARGV[3], tonumber(ARGV[6]), tonumber(ARGV[5]))
  end
  redis.call('HSET', ik, 'st', 'done', 'status', ARGV[7], 'body', ARGV[8], 'ct', ARGV[9])
  return 1
elseif op == 'abandon' then
  local ik = ikey(ARGV[3])
  if redis.call('HGET', ik, 'st') == 'in_flight' then
    redis.call('DEL', ik)
    redis.call('ZREM', k('idem'), ARGV[3])
  end
  return 1
else
  local keys = redis.call('ZRANGEBYSCORE', k('idem'), '-inf', ARGV[3])
  for _, key in ipairs(keys) do
    redis.call('DEL', ikey(key))
    redis.call('ZREM', k('idem'), key)
  end
  return #keys
end
