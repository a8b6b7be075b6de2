-- #include lib/keep_newest.lua
-- keep_dead: only the newest `max` dead (discarded) jobs of the dead index (`dead`, which
-- set_state and write_new keep) keep their record (see keep_newest).
local function keep_dead(dead, stats, max, prefix)
  keep_newest(dead, stats, max, prefix, 'discarded')
end
