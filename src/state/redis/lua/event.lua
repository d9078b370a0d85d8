-- Apply an event (relayed, found by reservation id) or the upstream's view of a call (found by
-- its call id). The first ending counts: a settled call only learns its object and call id.
-- ARGV: 1 prefix, 2 'relay' | 'upstream', 3 reservation id | call id, 4 call id named by the
-- event ('' if none), 5 status, 6 duration ('' if none), 7 final ('1'/'0'), 8 call object (JSON,
-- '' if none), 9 now, 10..13 budget terms hint ('' if none), 14 a stated charge that overrides
-- the computed one (an operator releasing a stuck call; '' if none).
-- Returns {'unknown'} | {'mismatch'} | {'bounds', period, tz} | {'applied', settled, rid, record}.
local rid
if ARGV[2] == 'upstream' then
  rid = redis.call('HGET', k('cids'), ARGV[3])
  if not rid then return { 'unknown' } end
else
  rid = ARGV[3]
end
local c = call_key(rid)
local cur = redis.call('HMGET', c, 'cid', 'live', 'hold', 'inc', 'price')
if not cur[2] then return { 'unknown' } end
local named = ARGV[4]
if ARGV[2] == 'relay' and cur[1] and named ~= '' and cur[1] ~= named then
  return { 'mismatch' }
end
local now = tonumber(ARGV[9])
local live = cur[2] == '1'
local final = ARGV[7] == '1'
local s = nil
if live and final then
  s = spend_at(now, terms_at(10), false)
  if not s then return needs_bounds() end
end
if ARGV[8] ~= '' then redis.call('HSET', c, 'obj', ARGV[8]) end
local bound = cur[1]
local owner = nil
if not bound and named ~= '' then owner = redis.call('HGET', k('cids'), named) end
if not bound and named ~= '' and (not owner or owner == rid) then
  -- The bind was lost (a crash between the answer and its write): learn the id here, unless
  -- another call has it (an upstream fault): then the event still applies.
  redis.call('HSET', c, 'cid', named)
  redis.call('HSET', k('cids'), named, rid)
  redis.call('ZADD', k('list'), 0, rid)
  bound = named
  -- Already settled: its id goes with its record (a settlement below records it itself).
  if not live then forget_later(rid, named, now) end
end
local settled = 0
if live then
  if final then
    local duration = nil
    if ARGV[6] ~= '' then duration = tonumber(ARGV[6]) end
    local charge = charge_for(duration or 0, tonumber(cur[4]) or 60, tonumber(cur[5]) or 0,
      tonumber(cur[3]) or 0)
    if ARGV[14] and ARGV[14] ~= '' then charge = math.max(0, tonumber(ARGV[14])) end
    settle(rid, ARGV[5], charge, duration, now, s)
    settled = 1
  else
    redis.call('HSET', c, 'st', ARGV[5], 'ut', ARGV[9])
    if bound then redis.call('ZADD', k('quiet'), ARGV[9], rid) end
  end
end
return { 'applied', settled, rid, redis.call('HGETALL', c) }
