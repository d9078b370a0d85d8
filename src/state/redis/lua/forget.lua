-- Forget the upstream ids of calls whose record's retention has ended by `now`: their entries
-- in `cids` and `list`, and the record if Redis has not expired it yet (`now` may run ahead of
-- Redis's clock). A call that is live again cannot be (a settled call is never revived), but
-- one is kept if it is. Then one step of a walk through `cids` (HSCAN from ARGV[4]) forgets
-- entries whose record is gone: calls settled before `gone` was kept (an older version).
-- ARGV: 1 prefix, 2 now, 3 at most this many ids, 4 the walk's cursor ('0' starts it).
-- Returns {ids taken from `gone` (fewer than asked: none left that are due), next cursor ('0':
-- the walk is done), entries the walk forgot}.
local ids = redis.call('ZRANGEBYSCORE', k('gone'), '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, cid in ipairs(ids) do
  local rid = redis.call('HGET', k('cids'), cid)
  if rid and redis.call('HGET', call_key(rid), 'live') ~= '1' then
    redis.call('DEL', call_key(rid))
    redis.call('HDEL', k('cids'), cid)
    redis.call('ZREM', k('list'), rid)
  end
  redis.call('ZREM', k('gone'), cid)
end
local scan = redis.call('HSCAN', k('cids'), ARGV[4], 'COUNT', tonumber(ARGV[3]))
local orphans = 0
local entries = scan[2]
for i = 1, #entries, 2 do
  local cid, rid = entries[i], entries[i + 1]
  if redis.call('EXISTS', call_key(rid)) == 0 then
    redis.call('HDEL', k('cids'), cid)
    redis.call('ZREM', k('list'), rid)
    orphans = orphans + 1
  end
end
return { #ids, scan[1], orphans }
