# Sourced by scripts/test.sh: a throwaway Redis (Debian's redis-server, installed when missing)
# for the optional stream data plane (orchestrator.dataplane), on a port of this checkout's own,
# with a password for the default user (the admin sciorch connects as; entries get ACL users
# of their own). Exports SCIORCH_TEST_REDIS. A server this hook started is stopped when test.sh
# exits; one already running is reused. Without it the data-plane tests skip (fail under CI).
_rd_base=${SCIORCH_REDIS_BASE:-${TMPDIR:-/tmp}/sciorch-redis-$(pwd | sha256sum | cut -c1-12)}
_rd_port=$((20000 + 0x$(pwd | sha256sum | cut -c1-4) % 10000))
if ! command -v redis-server >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server >/dev/null \
    || echo "25-redis: could not install redis-server" >&2
fi
mkdir -p "$_rd_base"
[ -f "$_rd_base/password" ] || head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$_rd_base/password"
_rd_pw=$(cat "$_rd_base/password")
if ! redis-cli -p "$_rd_port" -a "$_rd_pw" --no-auth-warning ping 2>/dev/null | grep -q PONG; then
  if command -v redis-server >/dev/null 2>&1 && redis-server --port "$_rd_port" --bind 127.0.0.1 \
      --daemonize yes --dir "$_rd_base" --pidfile "$_rd_base/redis.pid" \
      --logfile "$_rd_base/redis.log" --save "" --appendonly no --requirepass "$_rd_pw"; then
    for _ in $(seq 50); do
      redis-cli -p "$_rd_port" -a "$_rd_pw" --no-auth-warning ping 2>/dev/null | grep -q PONG && break
      sleep 0.1
    done
    at_exit "echo 'test.sh: stopping the test Redis'; kill \$(cat '$_rd_base/redis.pid') 2>/dev/null || true"
  else
    echo "25-redis: could not start redis-server; the data-plane tests will skip (fail under CI=true)" >&2
  fi
fi
export SCIORCH_TEST_REDIS="redis://default:$_rd_pw@127.0.0.1:$_rd_port/0"
unset _rd_base _rd_port _rd_pw
