#!/bin/sh
# Runs nginx in the foreground on 127.0.0.1:$PORT, serving ./static; its pid file, temp
# files and config go to a directory of its own under /tmp. NGINX_WORKERS sets its
# worker count (default 1).
set -eu
: "${PORT:?the platform sets PORT}"
nginx=$(command -v nginx || echo /usr/sbin/nginx)
run=$(mktemp -d /tmp/static-nginx.XXXXXX)
# Workers run as whoever runs this: nginx started as root would otherwise switch them
# to nobody, who may not read the app's files.
user=
if [ "$(id -u)" = 0 ]; then user="user root root;"; fi
cat > "$run/nginx.conf" <<CONF
$user
worker_processes ${NGINX_WORKERS:-1};
daemon off;
pid $run/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $run/body;
  proxy_temp_path $run/proxy;
  fastcgi_temp_path $run/fastcgi;
  uwsgi_temp_path $run/uwsgi;
  scgi_temp_path $run/scgi;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$PORT;
    root $PWD/static;
    default_type text/plain;
    location = /health { return 200 "ok\n"; }
    # The port it listens on, for a benchmark that calls it straight.
    location = /port { return 200 "\$server_port"; }
  }
}
CONF
exec "$nginx" -p "$run" -c "$run/nginx.conf"
