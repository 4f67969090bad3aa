-- The fleet's runtime changes: one JSON document with a version, replaced only by a writer that
-- read the current version (compare and set), so two admin calls made through two processes at
-- once never lose one of them: the later one reads the earlier one's document and tries again.
-- KEYS: 1 the overlay (hash: version, doc). ARGV: 1 the version the writer read, 2 its document,
--   3 the channel that tells every process a new version is there.
-- Returns {1, new version} when written, {0, current version, current document} when not.
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current, redis.call('HGET', KEYS[1], 'doc') or ''}
end
redis.call('HSET', KEYS[1], 'version', current + 1, 'doc', ARGV[2])
redis.call('PUBLISH', ARGV[3], current + 1)
return {1, current + 1}
