-- GCRA for a tenant's request rate, shared by every replica.
-- KEYS: 1 the tenant's rate key. ARGV: 1 now (µs), 2 emission interval (µs), 3 burst.
-- Returns 0 when the request is allowed, else the microseconds until one is.
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next_tat = tat + interval
local allow_at = next_tat - tonumber(ARGV[3]) * interval
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], next_tat, 'PX', math.floor((next_tat - now) / 1000) + 1)
return 0
