# qgafreeze: test, lint and install.  Run `make help` for the targets.
# Recipes use POSIX sh; every recipe that must stop on the first error says `set -e` itself.

PREFIX ?= /usr
DESTDIR ?=
PYTHON ?= /usr/bin/python3
SYSCONFDIR ?= /etc
# Units go where the distribution's own units go (systemd.pc knows: /lib/systemd/system on
# Debian 12, /usr/lib/systemd/system on Debian 13 and RHEL); /etc/systemd/system is the
# administrator's, for overrides.  Releases before 0.2 installed there: OLD_UNITDIR is cleaned.
UNITDIR ?= $(shell pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || \
	echo /usr/lib/systemd/system)
OLD_UNITDIR = $(SYSCONFDIR)/systemd/system
UNITS = qgafreeze.service qgafreeze.socket
LIBDIR = $(PREFIX)/lib/qgafreeze
LIBEXECDIR = $(PREFIX)/libexec/qgafreeze
BINDIR = $(PREFIX)/bin
DOCDIR = $(PREFIX)/share/doc/qgafreeze
MANDIR = $(PREFIX)/share/man
MANPAGES = $(wildcard docs/*.[1-8])
HOOK = $(LIBEXECDIR)/fsfreeze-hook
# The database presets' quiesce helpers (src/qgafreeze/quiesce), held as their sessions.
QUIESCE = $(LIBEXECDIR)/quiesce

SHELL := /bin/sh

# What the tests need from the distribution, and the same for dnf systems.
DEB_TEST_PKGS = python3-pydbus python3-systemd python3-yaml python3-pytest python3-venv \
	systemd-container dbus mariadb-server mariadb-client postgresql redis-server python3-hypothesis \
	python3-dbusmock python3-jsonschema groff-base pkgconf \
	qemu-system-x86 qemu-utils mmdebstrap e2fsprogs \
	libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients jq \
	debhelper dh-python lintian rpm checkpolicy semodule-utils
RPM_TEST_PKGS = python3-pydbus python3-systemd python3-pyyaml python3-pytest systemd-container \
	mariadb-server postgresql-server redis python3-hypothesis python3-dbusmock dbus-daemon \
	groff-base pkgconf-pkg-config python3-jsonschema
DEB_RUNTIME_PKGS = python3-yaml python3-pydbus python3-systemd
RPM_RUNTIME_PKGS = python3-pyyaml python3-pydbus python3-systemd

# Debian releases the VM tier boots guests of (tests/e2e): name fewer for a quicker local run;
# under CI=true anything but all three fails.
SUITES ?= bullseye bookworm trixie

# Linters live in their own venv outside the repo so that a fresh clone stays clean and the
# distribution's Python stays untouched; the stamp records the pins it was built with.
TOOLS = /var/cache/qgafreeze/tools
TOOL_PINS = ruff==0.6.9 mypy==1.11.2 types-PyYAML==6.0.12.20240917
RUFF = $(TOOLS)/bin/ruff
MYPY = $(TOOLS)/bin/mypy

.PHONY: help deps lint unit integration e2e demo bench bench-db soak test install uninstall check unitdir docs \
	selinux rpm deb install-host uninstall-host

help:
	@echo "make test         deps, lint, then unit and integration tests (needs root)"
	@echo "make deps         install test packages and the linters' venv ($(TOOLS))"
	@echo "make lint         ruff check src tests; mypy src"
	@echo "make unit         unit tests only"
	@echo "make integration  integration tests only (needs root)"
	@echo "make e2e          end-to-end tests in a real VM with qemu-ga (needs root)"
	@echo "make demo         one backup of a MariaDB guest through real qemu-ga, as a timeline"
	@echo "make bench        qgafreeze against the stock hook chain (docs/performance.md)"
	@echo "make bench-db     database write stalls during a backup, the part of bench (needs root)"
	@echo "make soak         1000 freeze/thaw cycles under write load with faults (needs root;"
	@echo "                  SOAK_CYCLES=N, SOAK_SEED=S repeats a run; docs/reliability.md)"
	@echo "make check        validate config/qgafreeze.yaml and print its plan"
	@echo "make selinux      compile the SELinux module (RHEL family) into build/selinux"
	@echo "make rpm          build the noarch RPM and its -selinux and -host subpackages into dist/"
	@echo "make deb          build dist/qgafreeze_VERSION_all.deb and its -host package (hypervisor)"
	@echo "make docs         regenerate the settings table and qgafreeze.yaml(5) from the schema"
	@echo "make install      install under DESTDIR/PREFIX; with no DESTDIR also configure"
	@echo "                  qemu-ga and enable qgafreeze.socket"
	@echo "make uninstall    undo install (keeps $(SYSCONFDIR)/qgafreeze.yaml)"
	@echo "make install-host install qgafreeze-host alone, on the hypervisor (no guest parts)"
	@echo "make uninstall-host  undo install-host"

deps:
	@set -e; \
	if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		missing=; \
		for p in $(DEB_TEST_PKGS); do \
			case "$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null)" in \
				*" ok installed") ;; \
				*) missing="$$missing $$p" ;; \
			esac; \
		done; \
		if [ -n "$$missing" ]; then \
			echo "deps: installing$$missing"; \
			apt-get update -q; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
		fi; \
	elif command -v dnf >/dev/null 2>&1; then \
		missing=; \
		for p in $(RPM_TEST_PKGS); do rpm -q "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			echo "deps: installing$$missing"; \
			dnf install -y $$missing; \
		fi; \
	else \
		echo "deps: neither apt-get nor dnf found; install by hand: $(DEB_TEST_PKGS)" >&2; \
		exit 1; \
	fi; \
	stamp="$(TOOL_PINS) python=$$($(PYTHON) -c 'import sys; print(sys.version.split()[0])')"; \
	mkdir -p "$(dir $(TOOLS))"; \
	exec 9>"$(TOOLS).lock"; \
	if command -v flock >/dev/null 2>&1; then flock 9; fi; \
	if [ -x "$(TOOLS)/bin/python" ] && [ "$$(cat "$(TOOLS)/.stamp" 2>/dev/null)" = "$$stamp" ]; then \
		exit 0; \
	fi; \
	echo "deps: building the linters' venv $(TOOLS) ($(TOOL_PINS))"; \
	rm -rf "$(TOOLS)"; \
	$(PYTHON) -m venv "$(TOOLS)"; \
	"$(TOOLS)/bin/python" -m pip install -q --disable-pip-version-check $(TOOL_PINS); \
	printf '%s\n' "$$stamp" > "$(TOOLS)/.stamp"

lint: deps
	$(RUFF) check src tests bench
	$(MYPY) src

unit:
	PYTHONPATH=src $(PYTHON) -m pytest -q tests/unit

integration:
	PYTHONPATH=src $(PYTHON) -m pytest -q tests/integration

# Real VMs (QEMU, software CPU) with the real qemu-ga, one guest per suite in SUITES; the first
# run builds their images (two at a time).
e2e:
	QGAFREEZE_SUITES="$(SUITES)" PYTHONPATH=src $(PYTHON) -m pytest -q tests/e2e

# qgafreeze against the distribution's stock hook chain; rewrites docs/performance.{md,png}.
# Then Redis clients' waits during a backup, preset against SAVE (its section, performance-redis.png),
# and the longest write stall of each database preset and mode against the stock FTWRL hook
# (bench-db: its section, performance-db.png; it quotes the Redis section's figures).
bench: deps
	@dpkg-query -W -f='$${Status}' python3-matplotlib 2>/dev/null | grep -q "ok installed" || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-matplotlib
	PYTHONPATH=src $(PYTHON) bench/compare.py
	PYTHONPATH=src $(PYTHON) bench/redis_stall.py
	$(MAKE) bench-db

bench-db:
	PYTHONPATH=src $(PYTHON) bench/dbstall.py

# Many cycles with MariaDB and a unit-based app under write load and random faults, in the
# container tier, checked after every cycle; prints the figures docs/reliability.md quotes.
SOAK_CYCLES ?= 1000
SOAK_SEED ?=
soak:
	SOAK_CYCLES="$(SOAK_CYCLES)" SOAK_SEED="$(SOAK_SEED)" PYTHONPATH=src $(PYTHON) bench/soak.py

# One backup of a MariaDB guest through real qemu-ga, printed as a timeline.
demo:
	PYTHONPATH=src $(PYTHON) tests/e2e/demo.py

# Every tier: the unit and container tiers, then the older releases' guests and trixie's libvirt
# module, in one run; trixie's other VM tests in a second pytest run beside it, from the first
# run's VM tier on (tests/run-tiers says why); the guest images of SUITES are built from the start.
test: deps lint selinux
	tests/run-tiers "$(PYTHON)" "$(SUITES)"

# Rewrite the documents made from the config schema (README's settings table, qgafreeze.yaml(5)).
docs:
	PYTHONPATH=src $(PYTHON) -m qgafreeze.schemadoc write

check:
	PYTHONPATH=src $(PYTHON) -m qgafreeze check -c config/qgafreeze.yaml

# The SELinux module for the RHEL family, written without policy headers (selinux/qgafreeze.te
# says why): `make test` compiles it, so that a syntax error fails here, not on a RHEL machine.
SELINUX_BUILD = build/selinux
selinux:
	@set -e; mkdir -p $(SELINUX_BUILD); \
	checkmodule -M -m -o $(SELINUX_BUILD)/qgafreeze.mod selinux/qgafreeze.te; \
	semodule_package -o $(SELINUX_BUILD)/qgafreeze.pp -m $(SELINUX_BUILD)/qgafreeze.mod \
		-f selinux/qgafreeze.fc; \
	echo "built $(SELINUX_BUILD)/qgafreeze.pp"

# The RPM, built by rpmbuild from a tarball of the tree (tracked and new files, not ignored
# ones) in build/rpm, so that the user's ~/rpmbuild is never touched.  Debian's rpm has no
# systemd-rpm-macros and an empty package database: there rpm/debian.macros stands in for the
# macros and --nodeps skips the BuildRequires check; qgafreeze.spec itself is unchanged.
# RPM_TOPDIR and RPM_DIST move the work and the result (tests build in their own directories).
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' src/qgafreeze/__init__.py)
RPM_TOPDIR ?= $(CURDIR)/build/rpm
RPM_DIST ?= $(CURDIR)/dist
rpm:
	@set -e; \
	[ -n "$(VERSION)" ] || { echo "rpm: no __version__ in src/qgafreeze/__init__.py" >&2; exit 1; }; \
	rm -rf "$(RPM_TOPDIR)"; mkdir -p "$(RPM_TOPDIR)/SOURCES" "$(RPM_DIST)"; \
	git ls-files -z --cached --others --exclude-standard | \
		xargs -0 sh -c 'for f; do [ -e "$$f" ] && printf "%s\0" "$$f"; done' sh | \
		tar --null -T - --transform "s,^,qgafreeze-$(VERSION)/," \
			-czf "$(RPM_TOPDIR)/SOURCES/qgafreeze-$(VERSION).tar.gz"; \
	extra=; \
	if [ -z "$$(rpm --eval '%{?systemd_post:1}')" ]; then \
		extra="--load=$(CURDIR)/rpm/debian.macros --nodeps"; \
	fi; \
	rpmbuild -bb --quiet $$extra --define "_topdir $(RPM_TOPDIR)" \
		--define "_rpmdir $(RPM_DIST)" --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
		--define "qgafreeze_version $(VERSION)" qgafreeze.spec; \
	ls "$(RPM_DIST)"/qgafreeze-$(VERSION)-*.noarch.rpm "$(RPM_DIST)"/qgafreeze-selinux-$(VERSION)-*.noarch.rpm \
		"$(RPM_DIST)"/qgafreeze-host-$(VERSION)-*.noarch.rpm

# The Debian packages, built with debhelper (debian/rules runs this Makefile's install and
# install-host) in a scratch copy of the tree under $TMPDIR, so that a build leaves nothing in
# the tree but dist/qgafreeze_VERSION_all.deb (the guest's) and
# dist/qgafreeze-host_VERSION_all.deb (the hypervisor's).  debian/changelog must name the
# version __init__.py does (a unit test checks it too).  DEB_VERSION=X builds the same tree as version X, changelog and
# __version__ rewritten in the copy: the VM tier upgrades over such an older build.
DEB_VERSION ?= $(VERSION)
DEB_SOURCES = Makefile README.md LICENSE pyproject.toml src systemd config docs debian
deb:
	@set -e; \
	logged=$$(dpkg-parsechangelog -l debian/changelog -S Version); \
	if [ "$$logged" != "$(VERSION)" ]; then \
		echo "deb: debian/changelog is at $$logged, src/qgafreeze/__init__.py at" \
			"$(VERSION): add a changelog entry" >&2; \
		exit 1; \
	fi; \
	scratch=$$(mktemp -d "$${TMPDIR:-/tmp}/qgafreeze-deb.XXXXXX"); \
	trap 'rm -rf "$$scratch"' EXIT; \
	mkdir "$$scratch/qgafreeze"; \
	tar -cf - --exclude=__pycache__ --exclude='*.pyc' $(DEB_SOURCES) | tar -xf - -C "$$scratch/qgafreeze"; \
	if [ "$(DEB_VERSION)" != "$(VERSION)" ]; then \
		sed -i -e '1s/([^)]*)/($(DEB_VERSION))/' "$$scratch/qgafreeze/debian/changelog"; \
		sed -i -e 's/^__version__ = .*/__version__ = "$(DEB_VERSION)"/' \
			"$$scratch/qgafreeze/src/qgafreeze/__init__.py"; \
	fi; \
	(cd "$$scratch/qgafreeze" && dpkg-buildpackage -b -us -uc); \
	mkdir -p dist; \
	for p in qgafreeze qgafreeze-host; do \
		cp "$$scratch/$${p}_$(DEB_VERSION)_all.deb" "dist/.$${p}_$(DEB_VERSION)_all.deb.tmp"; \
		mv -f "dist/.$${p}_$(DEB_VERSION)_all.deb.tmp" "dist/$${p}_$(DEB_VERSION)_all.deb"; \
		echo "built dist/$${p}_$(DEB_VERSION)_all.deb"; \
	done

# Where install puts the units (tests ask, rather than repeat the rule above).
unitdir:
	@echo "$(UNITDIR)"

# Unit files an older install left in $(OLD_UNITDIR), recognised by their first line: they would
# shadow the new ones, and an administrator's own override there is not ours to remove.  They are
# disabled first, and the links that enabled them go with them: a link left pointing at nothing
# makes older systemctl refuse to enable the new unit.
define remove_old_units
if [ "$(OLD_UNITDIR)" != "$(UNITDIR)" ]; then \
	for u in $(UNITS); do \
		f="$(DESTDIR)$(OLD_UNITDIR)/$$u"; \
		if [ -f "$$f" ] && head -n1 "$$f" | grep -q "^# $$u: "; then \
			if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
				systemctl disable "$$u" >/dev/null 2>&1 || true; \
			fi; \
			rm -f "$$f"; echo "removed $$f (left by an older install)"; \
		fi; \
		for l in "$(DESTDIR)$(OLD_UNITDIR)"/*.wants/"$$u" "$(DESTDIR)$(OLD_UNITDIR)"/*.requires/"$$u"; do \
			if [ -L "$$l" ] && [ ! -e "$$f" ] && [ "$$(readlink "$$l")" = "$(OLD_UNITDIR)/$$u" ]; then \
				rm -f "$$l"; echo "removed $$l (it enabled the old unit)"; \
			fi; \
		done; \
	done; \
fi
endef

# Wrappers run the distribution's Python isolated (-I: no PYTHONPATH, no user site, no script
# directory on sys.path) and without writing bytecode (-B): qemu-ga runs the hook while
# filesystems are frozen, when any write would block.  The hook also skips site (-S): it needs
# the standard library only, and site's .pth processing (setuptools' distutils hack on Debian)
# was a third of its start-up.  $(3) is the extra flag.
define wrapper
printf '%s\n' \
	'#!$(PYTHON) -IB$(3)' \
	'import sys' \
	'sys.path.insert(0, "$(LIBDIR)")' \
	'try:' \
	'    from qgafreeze.$(1) import main' \
	'except ImportError as exc:' \
	'    sys.exit(f"$(2): broken installation under $(LIBDIR): {exc}")' \
	'raise SystemExit(main())'
endef

install:
	@set -e; \
	if ! $(PYTHON) -c 'import yaml, pydbus, systemd.journal' 2>/dev/null; then \
		if [ -n "$(DESTDIR)" ]; then \
			echo "warning: $(PYTHON) cannot import yaml, pydbus and systemd.journal here;" \
				"the target system needs $(DEB_RUNTIME_PKGS)" >&2; \
		elif command -v apt-get >/dev/null 2>&1; then \
			echo "install: installing $(DEB_RUNTIME_PKGS)"; \
			apt-get update -q; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEB_RUNTIME_PKGS); \
		elif command -v dnf >/dev/null 2>&1; then \
			echo "install: installing $(RPM_RUNTIME_PKGS)"; \
			dnf install -y $(RPM_RUNTIME_PKGS); \
		else \
			echo "install: $(PYTHON) cannot import yaml, pydbus and systemd.journal, and there is" \
				"neither apt-get nor dnf to install them: install PyYAML, pydbus and" \
				"systemd-python for $(PYTHON) by hand, then run make install again" >&2; \
			exit 1; \
		fi; \
		if [ -z "$(DESTDIR)" ] && ! $(PYTHON) -c 'import yaml, pydbus, systemd.journal'; then \
			echo "install: $(PYTHON) still cannot import its dependencies" >&2; \
			exit 1; \
		fi; \
	fi
	@set -e; \
	for f in src/qgafreeze/*.py systemd/qgafreeze.service systemd/qgafreeze.socket \
			config/qgafreeze.yaml; do \
		[ -f "$$f" ] || { echo "install: $$f is missing from the source tree" >&2; exit 1; }; \
	done
	install -d -m 0755 "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(LIBEXECDIR)" \
		"$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(SYSCONFDIR)" "$(DESTDIR)$(DOCDIR)"
	@# The package is staged beside its final place and swapped in by rename, so that qemu-ga
	@# never runs the hook against a half-copied package, and modules removed upstream go away.
	rm -rf "$(DESTDIR)$(LIBDIR)/qgafreeze.new" "$(DESTDIR)$(LIBDIR)/qgafreeze.old"
	install -d -m 0755 "$(DESTDIR)$(LIBDIR)/qgafreeze.new"
	install -m 0644 src/qgafreeze/*.py "$(DESTDIR)$(LIBDIR)/qgafreeze.new/"
	install -d -m 0755 "$(DESTDIR)$(LIBDIR)/qgafreeze.new/quiesce"
	install -m 0644 src/qgafreeze/quiesce/*.py "$(DESTDIR)$(LIBDIR)/qgafreeze.new/quiesce/"
	$(PYTHON) -m compileall -q -d "$(LIBDIR)/qgafreeze" "$(DESTDIR)$(LIBDIR)/qgafreeze.new"
	@set -e; \
	if [ -d "$(DESTDIR)$(LIBDIR)/qgafreeze" ]; then \
		mv "$(DESTDIR)$(LIBDIR)/qgafreeze" "$(DESTDIR)$(LIBDIR)/qgafreeze.old"; \
	fi; \
	mv "$(DESTDIR)$(LIBDIR)/qgafreeze.new" "$(DESTDIR)$(LIBDIR)/qgafreeze"; \
	rm -rf "$(DESTDIR)$(LIBDIR)/qgafreeze.old"
	@# Written beside and renamed into place: qemu-ga may run the hook at any moment.
	@$(call wrapper,cli,qgafreeze) > "$(DESTDIR)$(BINDIR)/.qgafreeze.tmp"
	@chmod 0755 "$(DESTDIR)$(BINDIR)/.qgafreeze.tmp"
	@mv -f "$(DESTDIR)$(BINDIR)/.qgafreeze.tmp" "$(DESTDIR)$(BINDIR)/qgafreeze"
	@echo "installed $(DESTDIR)$(BINDIR)/qgafreeze"
	@$(call wrapper,shim,fsfreeze-hook,S) > "$(DESTDIR)$(LIBEXECDIR)/.fsfreeze-hook.tmp"
	@chmod 0755 "$(DESTDIR)$(LIBEXECDIR)/.fsfreeze-hook.tmp"
	@mv -f "$(DESTDIR)$(LIBEXECDIR)/.fsfreeze-hook.tmp" "$(DESTDIR)$(HOOK)"
	@echo "installed $(DESTDIR)$(HOOK)"
	@# Standard library only, like the hook (-S); a session started at freeze waits for it.
	@$(call wrapper,quiesce,quiesce,S) > "$(DESTDIR)$(LIBEXECDIR)/.quiesce.tmp"
	@chmod 0755 "$(DESTDIR)$(LIBEXECDIR)/.quiesce.tmp"
	@mv -f "$(DESTDIR)$(LIBEXECDIR)/.quiesce.tmp" "$(DESTDIR)$(QUIESCE)"
	@echo "installed $(DESTDIR)$(QUIESCE)"
	@set -e; $(remove_old_units)
	@set -e; \
	for u in $(UNITS); do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@LIBEXECDIR@|$(LIBEXECDIR)|g' \
			-e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' "systemd/$$u" > "$(DESTDIR)$(UNITDIR)/.$$u.tmp"; \
		chmod 0644 "$(DESTDIR)$(UNITDIR)/.$$u.tmp"; \
		mv -f "$(DESTDIR)$(UNITDIR)/.$$u.tmp" "$(DESTDIR)$(UNITDIR)/$$u"; \
		echo "installed $(DESTDIR)$(UNITDIR)/$$u"; \
	done; \
	if [ -e "$(DESTDIR)$(SYSCONFDIR)/qgafreeze.yaml" ]; then \
		echo "kept the existing $(DESTDIR)$(SYSCONFDIR)/qgafreeze.yaml"; \
	else \
		umask 077; \
		sed -e '/^apps:/,$$ s/^/# /' \
			-e '/^# apps:/i apps: {}  # nothing is quiesced until you declare apps (examples below)' \
			config/qgafreeze.yaml > "$(DESTDIR)$(SYSCONFDIR)/qgafreeze.yaml"; \
		chmod 0600 "$(DESTDIR)$(SYSCONFDIR)/qgafreeze.yaml"; \
		echo "installed $(DESTDIR)$(SYSCONFDIR)/qgafreeze.yaml (mode 0600, no apps yet)"; \
	fi; \
	install -m 0644 config/qgafreeze.yaml "$(DESTDIR)$(DOCDIR)/qgafreeze.yaml.example"; \
	for f in README.md docs/*.md docs/*.schema.json; do \
		if [ -f "$$f" ]; then install -m 0644 "$$f" "$(DESTDIR)$(DOCDIR)/"; fi; \
	done
	@set -e; \
	for f in $(MANPAGES); do \
		section="$${f##*.}"; \
		install -d -m 0755 "$(DESTDIR)$(MANDIR)/man$$section"; \
		install -m 0644 "$$f" "$(DESTDIR)$(MANDIR)/man$$section/"; \
	done
	@set -e; \
	if [ -n "$(DESTDIR)" ]; then exit 0; fi; \
	"$(BINDIR)/qgafreeze" install --hook "$(HOOK)"; \
	if [ ! -d /run/systemd/system ]; then \
		echo "warning: systemd is not running here: run 'systemctl daemon-reload'," \
			"'systemctl enable --now qgafreeze.socket' and" \
			"'systemctl try-restart qemu-guest-agent.service' once it is" >&2; \
		exit 0; \
	fi; \
	systemctl daemon-reload; \
	systemctl enable --now qgafreeze.socket; \
	systemctl try-restart qgafreeze.service; \
	if systemctl cat qemu-guest-agent.service >/dev/null 2>&1; then \
		systemctl try-restart qemu-guest-agent.service; \
		echo "qgafreeze.socket is enabled; qemu-ga now runs $(HOOK)"; \
	else \
		echo "qgafreeze.socket is enabled; qemu-guest-agent is not installed yet:" \
			"once it is, it will run $(HOOK)"; \
	fi

uninstall:
	@set -e; \
	if [ -n "$(DESTDIR)" ]; then exit 0; fi; \
	if [ -x "$(BINDIR)/qgafreeze" ]; then \
		"$(BINDIR)/qgafreeze" install --remove --hook "$(HOOK)" \
			|| echo "warning: could not take $(HOOK) out of qemu-ga's settings" >&2; \
	else \
		echo "warning: $(BINDIR)/qgafreeze is gone: check qemu-ga's fsfreeze hook by hand" >&2; \
	fi; \
	if [ ! -d /run/systemd/system ]; then \
		echo "warning: systemd is not running here: nothing to stop or disable" >&2; \
		exit 0; \
	fi; \
	systemctl try-restart qemu-guest-agent.service \
		|| echo "warning: could not restart qemu-guest-agent.service" >&2; \
	systemctl disable --now qgafreeze.socket qgafreeze.service \
		|| echo "warning: could not disable qgafreeze.socket and qgafreeze.service" >&2
	rm -f "$(DESTDIR)$(BINDIR)/qgafreeze" "$(DESTDIR)$(HOOK)" "$(DESTDIR)$(QUIESCE)" \
		"$(DESTDIR)$(UNITDIR)/qgafreeze.service" "$(DESTDIR)$(UNITDIR)/qgafreeze.socket"
	@set -e; $(remove_old_units)
	@set -e; \
	for f in $(MANPAGES); do rm -f "$(DESTDIR)$(MANDIR)/man$${f##*.}/$${f##*/}"; done
	rm -rf "$(DESTDIR)$(LIBDIR)/qgafreeze" "$(DESTDIR)$(LIBDIR)/qgafreeze.new" \
		"$(DESTDIR)$(LIBDIR)/qgafreeze.old" "$(DESTDIR)$(DOCDIR)"
	@# Only if empty: something else may have been installed beside us.
	@for d in "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(LIBEXECDIR)"; do rmdir "$$d" 2>/dev/null || true; done
	@if [ -e "$(DESTDIR)$(SYSCONFDIR)/qgafreeze.yaml" ]; then \
		echo "kept $(DESTDIR)$(SYSCONFDIR)/qgafreeze.yaml (your configuration): delete it by hand" \
			"if you no longer need it"; \
	fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload || echo "warning: systemctl daemon-reload failed" >&2; \
	fi

# The hypervisor's side alone: qgafreeze-host and its package, standard library only, none of
# the guest's parts and nothing to configure (docs/host.md).  The package is staged beside its
# place and swapped in by rename, so that a backup starting meanwhile never sees half of it.
HOST_LIBDIR = $(PREFIX)/lib/qgafreeze-host
HOST_DOCDIR = $(PREFIX)/share/doc/qgafreeze-host
install-host:
	@set -e; \
	lib="$(DESTDIR)$(HOST_LIBDIR)"; \
	install -d -m 0755 "$$lib" "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(HOST_DOCDIR)"; \
	rm -rf "$$lib/qgafreeze_host.new" "$$lib/qgafreeze_host.old"; \
	install -d -m 0755 "$$lib/qgafreeze_host.new"; \
	install -m 0644 src/qgafreeze_host/*.py "$$lib/qgafreeze_host.new/"; \
	$(PYTHON) -m compileall -q -d "$(HOST_LIBDIR)/qgafreeze_host" "$$lib/qgafreeze_host.new"; \
	if [ -d "$$lib/qgafreeze_host" ]; then mv "$$lib/qgafreeze_host" "$$lib/qgafreeze_host.old"; fi; \
	mv "$$lib/qgafreeze_host.new" "$$lib/qgafreeze_host"; \
	rm -rf "$$lib/qgafreeze_host.old"; \
	printf '%s\n' '#!$(PYTHON) -IB' 'import sys' 'sys.path.insert(0, "$(HOST_LIBDIR)")' \
		'from qgafreeze_host.cli import main' 'raise SystemExit(main())' \
		> "$(DESTDIR)$(BINDIR)/.qgafreeze-host.tmp"; \
	chmod 0755 "$(DESTDIR)$(BINDIR)/.qgafreeze-host.tmp"; \
	mv -f "$(DESTDIR)$(BINDIR)/.qgafreeze-host.tmp" "$(DESTDIR)$(BINDIR)/qgafreeze-host"; \
	install -m 0644 docs/host.md docs/cycle-report.schema.json "$(DESTDIR)$(HOST_DOCDIR)/"; \
	echo "installed $(DESTDIR)$(BINDIR)/qgafreeze-host"

uninstall-host:
	rm -f "$(DESTDIR)$(BINDIR)/qgafreeze-host"
	rm -rf "$(DESTDIR)$(HOST_LIBDIR)" "$(DESTDIR)$(HOST_DOCDIR)"
