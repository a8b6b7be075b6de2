-- #include lib/complete_record.lua
-- Acknowledge a message and mark its job completed, in one script; the record keeps the job's
-- payload from then on (its message, which held it, is gone).
-- KEYS: this worker's ack set, message hash, heartbeats, record, stats, dead, completed index;
-- ARGV: now ms, worker id, redis message id, job id, completed record ttl, completed records
-- kept at most, job record key prefix, payload (JSON), output (JSON, '' for none).
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
if redis.call('SREM', KEYS[1], ARGV[3]) > 0 then redis.call('HDEL', KEYS[2], ARGV[3]) end
if complete_record(KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[4], ARGV[1], ARGV[5], ARGV[6], ARGV[7]) then
  redis.call('HSET', KEYS[4], 'args', ARGV[8])
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[4], 'output', ARGV[9]) end
end
