# One image for the web app and the workers. On PyPI, torch==2.13.0 is the
# CUDA build, which the GPU worker uses; it also runs on CPU.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 WORKBENCH_DATA_DIR=/data WORKBENCH_MODELS_DIR=/models
WORKDIR /app
COPY requirements.txt .
RUN pip install torch==2.13.0 && pip install -r requirements.txt
COPY . .
RUN useradd --create-home --uid 1000 workbench && mkdir -p /data /models && chown workbench /data /models
USER workbench
EXPOSE 8000
CMD ["gunicorn", "workbench.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3"]
