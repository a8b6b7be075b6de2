-- #include lib/counter.lua
-- keep_done: note a job just completed in the index of completed jobs (`done`, by finalization
-- time) and, when the index holds more than `max`, forget the oldest completed jobs: their
-- records (`prefix` .. id) and their counts. Ids whose record has expired or moved on are dropped
-- from the index on the way.
local function keep_done(done, stats, id, now, max, prefix)
  redis.call('ZADD', done, now, id)
  local excess = redis.call('ZCARD', done) - tonumber(max)
  if excess <= 0 then return end
  local oldest = redis.call('ZPOPMIN', done, excess)
  for i = 1, #oldest, 2 do
    local key = prefix .. oldest[i]
    if redis.call('HGET', key, 'state') == 'completed' then
      redis.call('HINCRBY', stats, record_counter(key, 'completed'), -1)
      redis.call('DEL', key)
    end
  end
end
