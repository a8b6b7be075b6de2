-- Give claimed schedule entries back before their lease ends. KEYS: schedule, claimed; ARGV: due
-- ms, entry ids. An entry no longer claimed (forgotten, or its lease ran out and the claim script
-- took it back) is left as it is.
local due = ARGV[1]
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[2], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[1], due, ARGV[i])
  end
end
return #ARGV - 1
