# XIG — two commands matter: `make demo` and `make test`. Everything else is set up on the way.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
XIG   := $(VENV)/bin/xig
DEB_PACKAGES := orthanc orthanc-dicomweb dcmtk dicom3tools xmlsec1 postgresql rsyslog rsyslog-gnutls
# the binaries those packages provide, to tell whether they are installed already
DEB_BINARIES := /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/storescu /usr/bin/dciodvfy /usr/bin/xmlsec1 /usr/lib/postgresql/15/bin/initdb /usr/sbin/rsyslogd /usr/lib/*/rsyslog/lmnsd_gtls.so

.PHONY: install system-deps demo test lint typecheck bench clean

install: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for f in $(DEB_BINARIES); do [ -e "$$f" ] || missing=yes; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian packages: $(DEB_PACKAGES)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEB_PACKAGES); \
	  else \
	    echo "missing Debian packages ($(DEB_PACKAGES)); run as root or install them" >&2; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	@touch $@

demo: install
	$(XIG) demo

test: install lint typecheck
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check gateway conformance tests bench

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
