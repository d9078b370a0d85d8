-- Settle every live call of the tenant whose lease ended by now, at its full hold.
-- ARGV: 1 prefix, 2 now, 3..6 budget terms hint ('' if none).
-- Returns {'bounds', period, tz} | {'expired', records}.
local lapsed = reap(tonumber(ARGV[2]), terms_at(3))
if not lapsed then return needs_bounds() end
local out = {}
for i, rid in ipairs(lapsed) do out[i] = redis.call('HGETALL', call_key(rid)) end
return { 'expired', out }
