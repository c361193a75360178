#!/usr/bin/env bash
# A real single-node Slurm 22.05 on this machine, for the tests and the Slurm benchmark.
#
#   bash scripts/slurm-setup.sh          install what is missing, start what is not running
#   bash scripts/slurm-stop.sh [DAEMON]  stop it all again (or one daemon)
#
# Idempotent: what is installed is not installed again, a daemon that runs is left alone, so a
# second call costs about a second. Needs root on Debian 12 (apt-get) unless Slurm already runs.
# Everything lives under $SCIORCH_SLURM_BASE (default /var/lib/sciorch-slurm): configuration,
# state, logs, pid files, two fake GPUs and a shared directory for job files. Clients find the
# cluster through $SCIORCH_SLURM_BASE/env (SLURM_CONF, SCIORCH_SLURM_REST_URL, ...), which the
# test hook sources.
#
# The cluster: node $(hostname -s) at 127.0.0.1 with 16 CPUs, 16000 MiB and two GPUs of type
# "virtual" (character devices, scheduled like real ones); partitions `debug` (default,
# MaxTime 10 min) and `long` (MaxTime 60 min); slurmdbd with MariaDB for sacct and QoS
# (`normal`, `urgent` with a higher priority, `single` allowing one running job per user);
# slurmrestd with JWT on 127.0.0.1:$SCIORCH_SLURM_REST_PORT (default 6820).
set -euo pipefail

BASE=${SCIORCH_SLURM_BASE:-/var/lib/sciorch-slurm}
REST_PORT=${SCIORCH_SLURM_REST_PORT:-6820}
CTLD_PORT=${SCIORCH_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SCIORCH_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${SCIORCH_SLURM_DBD_PORT:-6819}
JOB_USER=${SCIORCH_SLURM_USER:-sciorch}
CLUSTER=sciorch
NODE=$(hostname -s)
ETC=$BASE/etc
CONF=$ETC/slurm.conf
export SLURM_CONF=$CONF
APT_LOG=${TMPDIR:-/tmp}/sciorch-slurm-apt.log

say() { echo "slurm-setup: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

alive() { # alive PIDFILE: the process named in PIDFILE runs
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

wait_for() { # wait_for SECONDS WHAT COMMAND...: poll every 0.1 s until COMMAND succeeds
  local limit=$1 what=$2 i
  shift 2
  for ((i = 0; i < limit * 10; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "timed out after ${limit}s waiting for $what (logs in $BASE/log)"
}

# ---------------------------------------------------------------- fast path: already running
cluster_up() {
  [ -f "$BASE/env" ] && alive "$BASE/run/slurmctld.pid" && alive "$BASE/run/slurmd.pid" \
    && alive "$BASE/run/slurmrestd.pid" && alive "$BASE/run/slurmdbd.pid" \
    && alive "$BASE/run/mariadbd.pid" && scontrol ping >/dev/null 2>&1
}

node_ready() { # the node answers and takes jobs (idle, mixed or allocated)
  local st
  st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)
  case $st in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

# ---------------------------------------------------------------- test users
# Two real users for the per-user account tests (alice, bob): POSIX users with a home, and Slurm
# associations in account sciorch with a few limits (list_sites shows them). Checked on every
# call, also when Slurm already runs; a user or association that exists is left alone.
TEST_USERS=(alice bob)
test_users() {
  local u
  [ "$(id -u)" = 0 ] || { say "not root: test users ${TEST_USERS[*]} not checked"; return 0; }
  for u in "${TEST_USERS[@]}"; do
    id "$u" >/dev/null 2>&1 || useradd --create-home --user-group --shell /bin/sh "$u"
    if [ -z "$(sacctmgr -n -P list assoc user="$u" account=sciorch format=user 2>/dev/null)" ]; then
      say "adding Slurm user $u to account sciorch"
      sacctmgr -i add user "$u" account=sciorch defaultaccount=sciorch >/dev/null
      sacctmgr -i modify user "$u" set qos=normal,urgent,single defaultqos=normal \
        maxjobs=20 maxsubmitjobs=50 >/dev/null
    fi
  done
}

if cluster_up && node_ready; then
  test_users
  say "already running (base $BASE)"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "Slurm is not running and starting it needs root"

# ---------------------------------------------------------------- packages
PACKAGES=(slurmctld slurmd slurm-client slurmdbd slurmrestd slurm-wlm-jwt-plugin munge mariadb-server acl)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -ne 0 ]; then
  say "installing ${missing[*]}"
  # Package scripts must not start daemons (no init system here; we start them ourselves).
  policy=/usr/sbin/policy-rc.d
  saved=""
  if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  restore_policy() { if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi; }
  trap restore_policy EXIT
  export DEBIAN_FRONTEND=noninteractive
  install() { apt-get install -y -q --no-install-recommends "${missing[@]}" >"$APT_LOG" 2>&1; }
  if ! install; then  # a fresh machine has no package lists yet
    apt-get update -q >"$APT_LOG" 2>&1 || die "apt-get update failed (see $APT_LOG)"
    install || die "apt-get install failed (see $APT_LOG)"
  fi
  restore_policy
  trap - EXIT
fi
dpkg -L slurm-wlm-jwt-plugin 2>/dev/null | grep '/auth_jwt\.so$' >/dev/null \
  || die "the JWT plugin (slurm-wlm-jwt-plugin) is missing"

# ---------------------------------------------------------------- users
# slurmrestd refuses requests as root or SlurmUser, so jobs submitted through it run as an
# ordinary account: $JOB_USER.
id "$JOB_USER" >/dev/null 2>&1 \
  || useradd --system --user-group --no-create-home --shell /bin/sh "$JOB_USER"
# ... and slurmrestd itself refuses to run as root or as SlurmUser: a system user of its own.
id slurmrestd >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin slurmrestd

# ---------------------------------------------------------------- host name and directories
if ! getent hosts "$NODE" >/dev/null; then
  say "adding $NODE to /etc/hosts"
  echo "127.0.0.1 $NODE" >>/etc/hosts
fi

mkdir -p "$ETC" "$BASE"/{state,spool,log,run,dev,shared,mysql-run}
chown slurm:slurm "$BASE"/{state,spool,log,run}
chmod 1777 "$BASE/shared"
for i in 0 1; do
  [ -c "$BASE/dev/nvidia$i" ] || mknod "$BASE/dev/nvidia$i" c 1 3
done

if [ ! -s "$ETC/jwt.key" ]; then
  head -c 32 /dev/urandom >"$ETC/jwt.key"
fi
chown slurm:slurm "$ETC/jwt.key"
chmod 0600 "$ETC/jwt.key"

# ---------------------------------------------------------------- configuration
changed=0
put() { # put FILE MODE OWNER < content: write only when the content differs
  local file=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp "$file.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  chown "$owner" "$tmp"
  if cmp -s "$tmp" "$file"; then rm -f "$tmp"; else mv -f "$tmp" "$file"; changed=1; fi
}

put "$CONF" 0644 root:root <<EOF
# Written by sciorch scripts/slurm-setup.sh: a single-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$ETC/jwt.key
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
PriorityType=priority/multifactor
PriorityWeightQOS=100000
PriorityWeightAge=0
PriorityWeightFairshare=0
EnforcePartLimits=ALL
KillWait=2
MinJobAge=600
InactiveLimit=0
MessageTimeout=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStorageEnforce=associations,limits,qos
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 Gres=gpu:virtual:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=10 State=UP
PartitionName=long Nodes=ALL MaxTime=60 State=UP
EOF

put "$ETC/gres.conf" 0644 root:root <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu Type=virtual File=$BASE/dev/nvidia[0-1]
EOF

DB_PASS=sciorch-slurmdbd
put "$ETC/slurmdbd.conf" 0600 slurm:slurm <<EOF
AuthType=auth/munge
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$ETC/jwt.key
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=slurm
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
EOF

if [ "$changed" = 1 ] && alive "$BASE/run/slurmctld.pid"; then
  say "configuration changed: restarting the daemons"
  bash "$(dirname "${BASH_SOURCE[0]}")/slurm-stop.sh" slurmrestd slurmd slurmctld slurmdbd
fi

# ---------------------------------------------------------------- munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    head -c 1024 /dev/urandom >/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  wait_for 10 munged sh -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------- MariaDB for slurmdbd
MYSQL_DATA=$BASE/mysql
mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld "$BASE/mysql-run"
if ! alive "$BASE/run/mariadbd.pid"; then
  if [ ! -d "$MYSQL_DATA/mysql" ]; then
    say "initialising MariaDB in $MYSQL_DATA"
    mkdir -p "$MYSQL_DATA"
    chown mysql:mysql "$MYSQL_DATA"
    mariadb-install-db --user=mysql --datadir="$MYSQL_DATA" --skip-test-db \
      --auth-root-authentication-method=socket >"$BASE/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $BASE/log/mariadb-install.log)"
  fi
  say "starting mariadbd"
  setsid mariadbd --user=mysql --datadir="$MYSQL_DATA" --skip-networking \
    --socket=/run/mysqld/mysqld.sock --pid-file="$BASE/mysql-run/mariadbd.pid" \
    --log-error="$BASE/mysql-run/mariadbd.log" --innodb-buffer-pool-size=64M \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$BASE/run/mariadbd.pid"
  wait_for 30 mariadbd mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  mariadb --socket=/run/mysqld/mysqld.sock -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;"
fi

# ---------------------------------------------------------------- slurmdbd and accounts
if ! alive "$BASE/run/slurmdbd.pid"; then
  say "starting slurmdbd"
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
fi
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -x "$CLUSTER" >/dev/null; then
  say "registering cluster $CLUSTER, accounts and QoS"
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if ! sacctmgr -n -P list qos format=name 2>/dev/null | grep -x urgent >/dev/null; then
  sacctmgr -i add qos urgent set priority=1000 >/dev/null
  sacctmgr -i add qos single set priority=0 MaxJobsPerUser=1 >/dev/null
  sacctmgr -i add account sciorch,other description=sciorch-tests organization=sciorch >/dev/null
  sacctmgr -i modify account root set qos=normal,urgent,single >/dev/null
fi
for user in root "$JOB_USER"; do
  if [ -z "$(sacctmgr -n -P list assoc user="$user" account=other format=user 2>/dev/null)" ]; then
    sacctmgr -i add user "$user" account=sciorch,other defaultaccount=sciorch >/dev/null
    sacctmgr -i modify user "$user" set qos=normal,urgent,single defaultqos=normal >/dev/null
  fi
done

test_users

# ---------------------------------------------------------------- slurmctld, slurmd
if ! alive "$BASE/run/slurmctld.pid"; then
  say "starting slurmctld"
  slurmctld
  wait_for 30 slurmctld scontrol ping
  # A slurmd that kept running registers with the new slurmctld at once when told to (SIGHUP:
  # reconfigure; its jobs are not touched), instead of at slurmctld's next node ping.
  if alive "$BASE/run/slurmd.pid"; then kill -HUP "$(cat "$BASE/run/slurmd.pid")"; fi
fi
if ! alive "$BASE/run/slurmd.pid"; then
  say "starting slurmd"
  slurmd -N "$NODE"
fi
# A node that was down (a crash, a stop while it ran jobs) comes back.
for _ in $(seq 1 100); do
  st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1) || true
  case $st in
    idle | mixed | allocated | completing) break ;;
    down* | drain* | fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.1
done
wait_for 30 "node $NODE to take jobs" node_ready

# ---------------------------------------------------------------- slurmrestd
if ! alive "$BASE/run/slurmrestd.pid"; then
  say "starting slurmrestd on 127.0.0.1:$REST_PORT"
  SLURM_JWT=daemon setsid slurmrestd -u slurmrestd -g slurmrestd -a rest_auth/jwt \
    -s openapi/v0.0.38,openapi/dbv0.0.38 "127.0.0.1:$REST_PORT" \
    </dev/null >>"$BASE/log/slurmrestd.log" 2>&1 &
  echo $! >"$BASE/run/slurmrestd.pid"
  wait_for 20 slurmrestd bash -c "exec 3<>/dev/tcp/127.0.0.1/$REST_PORT"
fi

put "$BASE/env" 0644 root:root <<EOF
export SLURM_CONF=$CONF
export SCIORCH_SLURM_BASE=$BASE
export SCIORCH_SLURM_REST_URL=http://127.0.0.1:$REST_PORT
export SCIORCH_SLURM_SHARED_DIR=$BASE/shared
export SCIORCH_SLURM_NODE=$NODE
export SCIORCH_SLURM_USER=$JOB_USER
EOF
say "ready: node $NODE $(sinfo -h -n "$NODE" -o %T | head -n1), slurmrestd http://127.0.0.1:$REST_PORT (source $BASE/env)"
