-- #include lib/take_lock.lua
-- #include lib/write_fresh.lua
-- The whole of an enqueue when epq's state lives in the broker's Redis, in one round trip: take
-- the uniqueness lock (if ARGV[3] is not ''), write the record, and put the message on its
-- priority lane.
-- KEYS: record, stats, lock (any key when there is no lock), message hash, lane;
-- ARGV: id, record ttl, lock holder or '', lock ttl, redis message id, message data, the record's
-- counter (queue|priority|state), then its fields as name, value pairs (not one JSON argument:
-- decoding it costs Redis more than the extra arguments).
-- Returns false when enqueued, the lock's holder value when another job holds it.

-- the record exists only if this very call already ran (a call sent again after its reply was
-- lost): the job is enqueued, and must not be pushed twice
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if ARGV[3] ~= '' then
  local current = take_lock(KEYS[3], ARGV[3], ARGV[4], ARGV[1])
  if current then return current end
end
write_fresh(KEYS[1], KEYS[2], ARGV[2], 8, ARGV[7], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[5], ARGV[6])
redis.call('RPUSH', KEYS[5], ARGV[5])
return false
