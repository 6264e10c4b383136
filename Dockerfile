# One image for the edge and the worker; compose.yaml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install . \
 && useradd --create-home --uid 10001 escapement

# Run from an empty directory so imports come from the installed package.
WORKDIR /home/escapement
USER escapement

EXPOSE 8080
CMD ["python", "-m", "services.edge"]
