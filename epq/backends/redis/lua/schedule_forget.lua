-- Forget schedule entries: out of an index (the schedule, or the claimed entries once their
-- messages are on the broker) and their messages dropped. KEYS: index, data; ARGV: entry ids.
for i = 1, #ARGV, 1000 do
  local last = math.min(i + 999, #ARGV)
  redis.call('ZREM', KEYS[1], unpack(ARGV, i, last))
  redis.call('HDEL', KEYS[2], unpack(ARGV, i, last))
end
return #ARGV
