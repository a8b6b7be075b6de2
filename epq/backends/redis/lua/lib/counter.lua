-- counter: the name of a record counter in the stats hash, `queue|priority|state`, as
-- epq.backends.base.counter_group makes it; record_counter: the counter of a stored record in a
-- state; waiting: the index of a queue|priority's available jobs by when they became due (as
-- epq.backends.redis.keys.waiting names it), from which the oldest waiting job's age is read, or
-- false where there is none.
local function counter(queue, priority, state)
  return queue .. '|' .. priority .. '|' .. state
end

local function record_counter(key, state)
  local at = redis.call('HMGET', key, 'queue', 'priority')
  return counter(at[1], at[2], state)
end

local function waiting(stats, queue, priority)
  -- (none where the broker's own lanes tell the lag: the Redis broker that keeps epq's state
  -- marks its Redis so, epq.backends.redis.keys.LAG_FROM_LANES)
  if redis.call('EXISTS', stats .. ':lag-from-lanes') == 1 then return false end
  return stats .. ':waiting:' .. queue .. '|' .. priority
end

-- due_at: when a stored record became due: its scheduled_at, else its created_at (a record due
-- when created leaves scheduled_at out), else `now`.
local function due_at(key, now)
  local at = redis.call('HMGET', key, 'scheduled_at', 'created_at')
  return at[1] or at[2] or now
end
