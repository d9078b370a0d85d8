-- Reads: 'get' (ARGV 3: call id) | 'list' (3: limit, 4: before or '') | 'quiet' (3: updated at
-- or before, 4: limit, 5: or lease ending by this: live bound calls either way, those lapsing
-- first). Returns call records (HGETALL lists).
local out = {}
local ids
if ARGV[2] == 'get' then
  local rid = redis.call('HGET', k('cids'), ARGV[3])
  ids = {}
  if rid then ids[1] = rid end
elseif ARGV[2] == 'list' then
  local max = '+'
  if ARGV[4] ~= '' then max = '(' .. ARGV[4] end
  ids = redis.call('ZREVRANGEBYLEX', k('list'), max, '-', 'LIMIT', 0, tonumber(ARGV[3]))
else
  -- The live set holds pending calls too; the quiet set only bound ones.
  ids = {}
  local seen = {}
  local limit = tonumber(ARGV[4])
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', k('live'), '-inf', ARGV[5])) do
    if #ids >= limit then break end
    if redis.call('ZSCORE', k('quiet'), rid) then
      ids[#ids + 1] = rid
      seen[rid] = true
    end
  end
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', k('quiet'), '-inf', ARGV[3], 'LIMIT', 0, limit)) do
    if #ids >= limit then break end
    if not seen[rid] then ids[#ids + 1] = rid end
  end
end
for _, rid in ipairs(ids) do
  local record = redis.call('HGETALL', call_key(rid))
  if #record > 0 then
    out[#out + 1] = record
  elseif ARGV[2] == 'list' then
    redis.call('ZREM', k('list'), rid) -- past its retention
  end
end
return out
