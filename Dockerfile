FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir . \
 && mkdir -p /var/lib/redrive/artifacts && chown -R nobody:nogroup /var/lib/redrive
# Owned by the user the services run as: a named volume mounted here (compose's artifacts)
# starts as a copy of this directory, so executors can write step files into it.
ENV REDRIVE_DATA_DIR=/var/lib/redrive
USER nobody
