-- Revoke a consent record, once: the first revocation stands.
-- KEYS[1]: the record (hash: rec = the record as registered, revoked_at, revoked_by).
-- ARGV: now (microseconds, as a string), by. Returns 0 (no record), 1 (revoked), 2 (already).
if redis.call('HEXISTS', KEYS[1], 'rec') == 0 then
  return 0
end
if redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1]) == 0 then
  return 2
end
redis.call('HSET', KEYS[1], 'revoked_by', ARGV[2])
return 1
