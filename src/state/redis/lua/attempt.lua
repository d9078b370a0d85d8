-- Count an attempt to a number under every limit of a cap, or refuse and count nothing.
-- KEYS[1]: the number's attempts in a scope (zset: reservation id by time, microseconds).
-- ARGV: attempt id, now, forget before, key lifetime (ms), then per limit: window start
-- (exclusive), max. Times are passed as strings and used as given: Lua's numbers would print
-- them rounded.
local key = KEYS[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. ARGV[3])
local exceeded = false
for i = 5, #ARGV, 2 do
  local count = redis.call('ZCOUNT', key, '(' .. ARGV[i], '+inf')
  if count >= tonumber(ARGV[i + 1]) then
    exceeded = true
  end
end
if exceeded then
  -- The times the gateway needs to say when a call may go again.
  local reply = {'exceeded'}
  for _, at in ipairs(redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')) do
    table.insert(reply, at)
  end
  -- ZRANGE WITHSCORES alternates member and score: keep the scores.
  local scores = {'exceeded'}
  for j = 3, #reply, 2 do
    table.insert(scores, reply[j])
  end
  return scores
end
redis.call('ZADD', key, ARGV[2], ARGV[1])
redis.call('PEXPIRE', key, ARGV[4])
return {'taken'}
