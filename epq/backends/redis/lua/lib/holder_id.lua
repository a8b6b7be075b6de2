-- holder_id: the job id of a uniqueness lock's holder value ('<job id>|<details>'), as
-- epq.backends.base.Holder.parse reads it.
local function holder_id(value)
  local sep = string.find(value, '|', 1, true)
  return sep and string.sub(value, 1, sep - 1) or value
end
