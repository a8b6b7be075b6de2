-- lock_digest: the digest a record keeps of its uniqueness lock's key, the part after the last
-- ':' (epq.records.lock_fields; every lock a bulk enqueue takes is its kind's own).
local function lock_digest(key)
  return string.match(key, '[^:]*$')
end
