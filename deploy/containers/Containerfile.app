# The project's files over a base image built by build.sh (triage-base: no torch; triage-base-torch: inference).
# Read-only for the triage user; the model package is copied in (mount another read-only + TRIAGE_MODEL_PATH).
ARG BASE
FROM $BASE
COPY triage_node /opt/triage/app/triage_node
COPY workers /opt/triage/app/workers
COPY models /opt/triage/app/models
COPY bin /opt/triage/venv/bin/
USER triage
WORKDIR /var/lib/triage-node
ENTRYPOINT ["/opt/triage/venv/bin/triage-node"]
CMD ["--help"]
