-- callgate: helpers shared by the tenant scripts (prepended to each of them).
--
-- ARGV[1] is the tenant's key prefix, "<prefix>:{<tenant>}:": every key a tenant script touches
-- carries the tenant's hash tag, so on Redis Cluster they all live in the tenant's slot.
-- Amounts are integers (credits, microseconds); Redis keeps them as int64 (HINCRBY) and Lua
-- compares them exactly (all below 2^53).
local P = ARGV[1]
local function k(name) return P .. name end
local function call_key(rid) return P .. 'c:' .. rid end
-- How long a settled call's record (and its idempotency answer) is kept, milliseconds.
local RETENTION_MS = 30 * 24 * 3600 * 1000

-- A settled call's upstream id is forgotten with its record: `gone` holds "<reservation id>
-- <upstream id>" by the end of the record's retention (microseconds, in the time of `now`), and
-- `forget.lua` removes them then from `cids` and `list`, which would otherwise keep an entry for
-- every call ever bound.
local function forget_later(rid, cid, now)
  redis.call('ZADD', k('gone'), now + RETENTION_MS * 1000, rid .. ' ' .. cid)
end

-- The tenant's spend as of `now`: {spent, pstart, pend, period, tz}, or nil when the period
-- rolled over and the bounds of the new one are needed (the caller asks Rust for them: time
-- zones are not known here). `terms` (period, tz, bstart, bend), when given, are the bounds of
-- the period containing `now` under those terms; `adopt` makes them the tenant's terms (an
-- admission under changed terms).
local function spend_at(now, terms, adopt)
  local b = redis.call('HMGET', k('book'), 'period', 'tz', 'pstart', 'pend', 'spent')
  local s = {
    period = b[1] or 'none', tz = b[2] or 'UTC', pstart = tonumber(b[3]) or 0,
    pend = tonumber(b[4]), spent = tonumber(b[5]) or 0,
  }
  if terms and adopt and (terms.period ~= s.period or terms.tz ~= s.tz) then
    s.period, s.tz, s.pend = terms.period, terms.tz, nil
  end
  if s.period == 'none' then return s end
  if s.pend and now >= s.pstart and now < s.pend then return s end
  if not terms or terms.period ~= s.period or terms.tz ~= s.tz then return nil end
  if terms.bstart > s.pstart then s.pstart, s.spent = terms.bstart, 0 end
  -- A clock that went back keeps the later period (spend is never handed back twice).
  if terms.bstart == s.pstart then s.pend = terms.bend else s.pend = nil end
  return s
end

local function store_spend(s)
  redis.call('HSET', k('book'), 'period', s.period, 'tz', s.tz, 'pstart', s.pstart,
    'pend', s.pend or '', 'spent', s.spent)
end

-- Credits charged for `duration` seconds: started increments times the price, capped by the
-- hold (the same rule as `accounting::charge_for`).
local function charge_for(duration, increment, price, hold)
  if increment < 1 then increment = 1 end
  if duration < 0 then duration = 0 end
  local increments = math.floor((duration + increment - 1) / increment)
  return math.min(increments * price, hold)
end

-- End a live call's accounting: charge it, free its slot and hold, keep its record a while.
local function settle(rid, status, charge, duration, now, s)
  local c = call_key(rid)
  local hold = tonumber(redis.call('HGET', c, 'hold')) or 0
  redis.call('HSET', c, 'live', 0, 'hold', 0, 'chg', charge, 'st', status, 'ut', now)
  if duration then redis.call('HSET', c, 'dur', duration) end
  redis.call('ZREM', k('live'), rid)
  redis.call('ZREM', k('quiet'), rid)
  -- 0 - hold, not -hold: Lua's -0 is written "-0", which HINCRBY refuses.
  redis.call('HINCRBY', k('book'), 'holds', 0 - hold)
  s.spent = s.spent + charge
  store_spend(s)
  redis.call('PEXPIRE', c, RETENTION_MS)
  local cid = redis.call('HGET', c, 'cid')
  if cid then forget_later(rid, cid, tonumber(now)) end
end

-- Settle every live call whose lease ended by `now` at its full hold; their ids, or nil when
-- the spend's period bounds are needed first.
local function reap(now, terms)
  local lapsed = redis.call('ZRANGEBYSCORE', k('live'), '-inf', now)
  if #lapsed == 0 then return lapsed end
  local s = spend_at(now, terms, false)
  if not s then return nil end
  for _, rid in ipairs(lapsed) do
    local hold = tonumber(redis.call('HGET', call_key(rid), 'hold')) or 0
    settle(rid, 'expired', hold, nil, now, s)
  end
  return lapsed
end

-- Budget terms from ARGV[i..i+3] (period, tz, start, end), or nil when ARGV[i] is empty.
local function terms_at(i)
  if ARGV[i] == '' then return nil end
  return { period = ARGV[i], tz = ARGV[i + 1], bstart = tonumber(ARGV[i + 2]),
           bend = tonumber(ARGV[i + 3]) }
end

local function needs_bounds()
  local b = redis.call('HMGET', k('book'), 'period', 'tz')
  return { 'bounds', b[1] or 'none', b[2] or 'UTC' }
end
