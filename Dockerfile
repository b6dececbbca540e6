# The server in an image built FROM scratch: nothing is pulled from a
# registry. `make image` builds a static ./server (CGO_ENABLED=0) and fills
# the build context, .image/, with the binary, the CA certificates the LLM
# client needs to verify an https LLM_BASE_URL, and two empty folders:
#   .image/rootfs/usr/local/bin/server
#   .image/rootfs/etc/ssl/certs/ca-certificates.crt
#   .image/rootfs/tmp                (mode 1777: CONTROL_SOCKET=/tmp/... works)
#   .image/state/                    (becomes /var/lib/corral, the working folder)
# Build by hand: make image CONTAINER=docker, or see the image target of the Makefile.
FROM scratch
COPY rootfs/ /
# The working folder holds data/ (the SQLite database and the control
# socket); it belongs to the unprivileged user the server runs as.
COPY --chown=65534:65534 state/ /var/lib/corral/
WORKDIR /var/lib/corral
USER 65534:65534
ENV HOST=0.0.0.0 PORT=8000
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/server"]
