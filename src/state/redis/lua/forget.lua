-- Forget the upstream ids of calls whose record's retention has ended by `now`: their entries
-- in `cids` and `list`, and the record if Redis has not expired it yet (`now` may run ahead of
-- Redis's clock). A call that is live again cannot be (a settled call is never revived), but
-- one is kept if it is.
-- ARGV: 1 prefix, 2 now, 3 at most this many ids. Returns how many ids it took from `gone` (fewer
-- than asked: none are left that are due).
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
return #ids
