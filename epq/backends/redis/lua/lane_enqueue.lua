-- Put a message on its priority lane. KEYS: the message hash, the lane list; ARGV: redis message
-- id, message data.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
