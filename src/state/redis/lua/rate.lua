-- GCRA for a tenant's request rate, shared by every replica, on Redis's own clock (replicas'
-- clocks need not agree: a request stamped a little earlier by another replica must not cost
-- an allowance).
-- KEYS: 1 the tenant's rate key. ARGV: 1 emission interval (µs), 2 burst.
-- Returns 0 when the request is allowed, else the microseconds until one is.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next_tat = tat + interval
local allow_at = next_tat - tonumber(ARGV[2]) * interval
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], next_tat, 'PX', math.floor((next_tat - now) / 1000) + 1)
return 0
