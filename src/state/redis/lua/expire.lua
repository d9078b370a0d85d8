-- Settle every live call of the tenant whose lease ended by now, at its full hold; and say, for
-- each reservation the account set holds for this tenant past its lease, whether it is still
-- live (and until when), so that only slots of calls that ended are freed there.
-- ARGV: 1 prefix, 2 now, 3..6 budget terms hint ('' if none), 7.. candidate reservation ids.
-- Returns {'bounds', period, tz} | {'expired', records, {id, lease end or -1 when not live}...}.
local lapsed = reap(tonumber(ARGV[2]), terms_at(3))
if not lapsed then return needs_bounds() end
local out = {}
for i, rid in ipairs(lapsed) do out[i] = redis.call('HGETALL', call_key(rid)) end
local candidates = {}
for i = 7, #ARGV do
  local cur = redis.call('HMGET', call_key(ARGV[i]), 'live', 'lease')
  local lease = -1
  if cur[1] == '1' then lease = tonumber(cur[2]) end
  candidates[#candidates + 1] = { ARGV[i], lease }
end
return { 'expired', out, candidates }
