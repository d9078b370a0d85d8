-- Adjust a tenant's spend in its current budget period by a number of credits (negative: a top
-- up by an operator).
-- ARGV: 1 prefix, 2 delta, 3 now, 4..7 the budget's terms and the bounds of the period
-- containing now ('' when the tenant has no budget).
-- Returns {'ok'} | {'bounds', period, tz}.
local terms = terms_at(4)
local s = spend_at(tonumber(ARGV[3]), terms, terms ~= nil)
if not s then return needs_bounds() end
s.spent = s.spent + tonumber(ARGV[2])
store_spend(s)
return { 'ok' }
