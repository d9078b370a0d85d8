-- Admission, for one tenant: reap lapsed leases, then take a slot and hold the call's worst-case
-- cost, or refuse and take nothing.
-- ARGV: 1 prefix, 2 reservation id, 3 tenant, 4 token hash, 5 tenant slot limit (-1: none),
-- 6 budget ('1'/'0'), 7 credits, 8..11 budget terms and the bounds of the period containing now
-- ('' when no budget), 12 hold, 13 price, 14 increment, 15 max duration, 16 lease end, 17 now,
-- 18 tenant webhook ('' when none).
-- Returns {outcome, a, b, reaped ids}: 'admitted' | 'tenant_full', limit | 'credits', needed,
-- available.
local now = tonumber(ARGV[17])
-- Run twice (a client retried after a lost reply): the first run decided.
if redis.call('EXISTS', call_key(ARGV[2])) == 1 then return { 'admitted', 0, 0, {} } end
local terms = terms_at(8)
-- Lapsed leases are settled here when the spend's period is at hand, else by the sweeper.
local reaped = reap(now, terms) or {}
local budget = ARGV[6] == '1'
local s = nil
if budget then
  s = spend_at(now, terms, true)
  if not s then return needs_bounds() end
end
local limit = tonumber(ARGV[5])
if limit >= 0 and redis.call('ZCARD', k('live')) >= limit then
  return { 'tenant_full', limit, 0, reaped }
end
local hold = tonumber(ARGV[12])
if budget then
  local holds = tonumber(redis.call('HGET', k('book'), 'holds')) or 0
  local available = tonumber(ARGV[7]) - s.spent - holds
  if hold > available then return { 'credits', hold, math.max(available, 0), reaped } end
end
local rid = ARGV[2]
local c = call_key(rid)
redis.call('HSET', c, 'rid', rid, 'tenant', ARGV[3], 'tok', ARGV[4], 'st', 'pending', 'live', 1,
  'hold', hold, 'chg', 0, 'price', ARGV[13], 'inc', ARGV[14], 'maxd', ARGV[15],
  'lease', ARGV[16], 'ct', ARGV[17], 'ut', ARGV[17])
if ARGV[18] ~= '' then redis.call('HSET', c, 'wh', ARGV[18]) end
redis.call('ZADD', k('live'), ARGV[16], rid)
redis.call('HINCRBY', k('book'), 'holds', hold)
if budget then store_spend(s) end
return { 'admitted', 0, 0, reaped }
