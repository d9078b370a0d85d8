-- Forget settled calls whose record's retention has ended by `now`: `gone` holds
-- "<reservation id> <upstream id>" by that time (`forget_later`). Each due call's `cids` entry
-- (if it still names that reservation), its `list` entry and its record (if Redis has not
-- expired it yet: `now` may run ahead of Redis's clock, and a live call, which a settled call
-- never becomes again, is kept) go.
-- Then, until one whole pass is done (`walked`), one step of a walk through `cids` (HSCAN from
-- ARGV[4]) forgets entries whose record is gone: calls settled before `gone` was kept (an older
-- version).
-- ARGV: 1 prefix, 2 now, 3 at most this many of each, 4 the walk's cursor ('0' starts it).
-- Returns {members taken from `gone` (fewer than asked: none left that are due), next cursor
-- ('0': the walk is done), entries the walk forgot}.
local due = redis.call('ZRANGEBYSCORE', k('gone'), '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  local space = string.find(member, ' ', 1, true)
  if space then
    local rid, cid = string.sub(member, 1, space - 1), string.sub(member, space + 1)
    if redis.call('HGET', call_key(rid), 'live') ~= '1' then
      redis.call('DEL', call_key(rid))
      if redis.call('HGET', k('cids'), cid) == rid then redis.call('HDEL', k('cids'), cid) end
      redis.call('ZREM', k('list'), rid)
    end
  end
  redis.call('ZREM', k('gone'), member)
end
local cursor, orphans = '0', 0
if redis.call('EXISTS', k('walked')) == 0 then
  local scan = redis.call('HSCAN', k('cids'), ARGV[4], 'COUNT', tonumber(ARGV[3]))
  cursor = scan[1]
  local entries = scan[2]
  for i = 1, #entries, 2 do
    local cid, rid = entries[i], entries[i + 1]
    if redis.call('EXISTS', call_key(rid)) == 0 then
      redis.call('HDEL', k('cids'), cid)
      redis.call('ZREM', k('list'), rid)
      orphans = orphans + 1
    end
  end
  if cursor == '0' then redis.call('SET', k('walked'), '1') end
end
return { #due, cursor, orphans }
