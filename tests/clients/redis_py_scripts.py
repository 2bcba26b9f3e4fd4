"""redis-py's own lock and script helpers against dedupd's Redis endpoint.

Run by tests/redis_endpoint.rs with DEDUPD_PORT set; RESP picks the protocol (2 or 3).
Exits non-zero with the failed assertion on stderr.
"""

import os
import uuid

import redis
from redis.exceptions import LockNotOwnedError

port = int(os.environ["DEDUPD_PORT"])
protocol = int(os.environ.get("RESP", "2"))
r = redis.Redis(host="127.0.0.1", port=port, protocol=protocol)
prefix = f"py-{uuid.uuid4().hex}:"

# Lock: acquire, refused while held, extend, release by the wrong owner refused, release.
name = prefix + "lock:order-42"
lock = r.lock(name, timeout=10)
assert lock.acquire(blocking=False), "first acquire"
assert lock.owned() and lock.locked()
other = r.lock(name, timeout=10)
assert not other.acquire(blocking=False), "acquired while held"
assert lock.extend(20), "extend"
ttl = r.pttl(name)
assert 20_000 < ttl <= 30_000, f"ttl after extend: {ttl}"
assert lock.reacquire(), "reacquire"
assert 9_000 < r.pttl(name) <= 10_000
# A client that believes it holds the lock with another token: the scripts refuse it.
impostor = r.lock(name, timeout=10)
for what, attempt in [("release", impostor.release), ("extend", lambda: impostor.extend(5))]:
    impostor.local.token = b"not-the-owner"  # release() forgets it
    try:
        attempt()
    except LockNotOwnedError:
        pass
    else:
        raise AssertionError(f"{what} by the wrong owner was accepted")
assert r.get(name) == lock.local.token, "the owner's token is still there"
lock.release()
assert r.exists(name) == 0, "released"
assert other.acquire(blocking=True, blocking_timeout=2), "acquire after release"
other.release()
# The context-manager form.
with r.lock(name, timeout=5, blocking_timeout=2):
    assert r.exists(name) == 1
assert r.exists(name) == 0

# register_script: EVALSHA first, EVAL on NOSCRIPT, then EVALSHA again.
r.script_flush()
claim = r.register_script(
    "return redis.call('set', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])"
)
key = prefix + "msg:1"
assert claim(keys=[key], args=["1", 100]) in (b"OK", "OK", True), "first claim"
assert claim(keys=[key], args=["1", 100]) is None, "second claim is refused"
assert r.script_exists(claim.sha) == [True]
count = r.register_script("return #KEYS + #ARGV")
assert count(keys=["a", "b"], args=[1, 2, 3]) == 5
# A pipeline loads the script it needs first (no MULTI: dedupd has no transactions yet).
pipe = r.pipeline(transaction=False)
claim(keys=[prefix + "msg:2"], args=["1", 100], client=pipe)
claim(keys=[prefix + "msg:2"], args=["1", 100], client=pipe)
first, second = pipe.execute()
assert first in (b"OK", "OK", True) and second is None, (first, second)
r.delete(key, prefix + "msg:2")
print(f"redis-py {redis.__version__} RESP{protocol}: lock and register_script ok")
