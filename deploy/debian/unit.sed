# The packaged unit (deploy/debian/ringway.service) is deploy/ringway.service with exactly
# these changes; scripts/package-check.sh fails when the two drift apart. Regenerate with
#   sed -f deploy/debian/unit.sed deploy/ringway.service > deploy/debian/ringway.service
# The package installs the binary as /usr/bin/ringway and its docs under /usr/share/doc, and
# creates a fixed system user `ringway` (usr/lib/sysusers.d/ringway.conf) instead of
# DynamicUser, so that TLS keys can be given to that user or its group.
1,2c\
# ringway: WebSocket edge gateway, as the Debian package installs it\
# (/usr/lib/systemd/system/ringway.service). Generated from deploy/ringway.service by\
# deploy/debian/unit.sed; checked by scripts/package-check.sh. Change it with a drop-in\
# (`systemctl edit ringway`), not here: an upgrade replaces this file.
s|^Documentation=file:///usr/local/share/doc/ringway/README.md$|Documentation=file:///usr/share/doc/ringway/README.md|
s|^ExecStart=/usr/local/bin/ringway |ExecStart=/usr/bin/ringway |
/^# Identity: a throwaway user allocated at start/c\
# Identity: the system user `ringway` the package creates (systemd-sysusers); it owns no\
# files, and /etc/ringway is root's: the gateway can read its config, not change it.
s|^DynamicUser=yes$|User=ringway\
Group=ringway|
