-- #include lib/keep_newest.lua
-- keep_done: note a job just completed in the index of completed jobs (`done`, by finalization
-- time); only the newest `max` completed jobs keep their record (see keep_newest).
local function keep_done(done, stats, id, now, max, prefix)
  redis.call('ZADD', done, now, id)
  keep_newest(done, stats, max, prefix, 'completed')
end
