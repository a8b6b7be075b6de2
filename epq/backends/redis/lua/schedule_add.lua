-- Keep an encoded message in the schedule until it is due, once per entry id: an entry that
-- exists (waiting or claimed by a promoter) is left as it is, so that adding it again (a call
-- sent again after its reply was lost) can neither move it nor make a claimed one due twice.
-- KEYS: schedule, data; ARGV: entry id, message, due ms. Returns 1 when added.
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
