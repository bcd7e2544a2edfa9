#!/usr/bin/env bash
# vagrant/node.sh NODE_INDEX NODE_COUNT: make this VM a nodeproxy node (run by the Vagrantfile as root).
#
#   - pods: network namespaces "client" and "web" on veths npv-client / npv-web, addresses from this node's
#     pod CIDR 10.244.<index>.0/24 (client .10, web .20), default route via the link-local gateway
#   - routes to the other nodes' pod CIDRs over the private network (192.168.56.1<index>)
#   - the web pod runs nodeproxy's lab backend (HTTP on 8080, echo on 9000) as the unit np-pod-web
#   - /etc/nodeproxy/config.yaml: service web (VIP 10.96.0.10:80) and echo (10.96.0.11:9000) with an
#     endpoint in the web pod of every node
#   - nodeproxy itself as the systemd service (systemd/nodeproxy.service), admin socket for group "vagrant"
#
# Idempotent: `vagrant provision` rebuilds the pods and restarts the services.
set -euo pipefail

index=${1:?node index (1, 2, ...)}
count=${2:?number of nodes}
gateway=169.254.1.1
repo=${NODEPROXY_REPO:-/vagrant}  # Vagrant uploads this script elsewhere before it runs it

pod() {  # pod NAME HOST_ADDRESS
    local name=$1 address=$2 veth=npv-$1
    ip netns del "$name" 2>/dev/null || true
    ip link del "$veth" 2>/dev/null || true
    ip netns add "$name"
    ip link add "$veth" type veth peer name eth0 netns "$name"
    ip -n "$name" link set lo up
    ip -n "$name" link set eth0 up
    ip -n "$name" addr add "$address/32" dev eth0
    ip -n "$name" route add "$gateway" dev eth0 scope link
    ip -n "$name" route add default via "$gateway" dev eth0
    ip addr add "$gateway/32" dev "$veth" scope link
    ip link set "$veth" up
    ip route replace "$address/32" dev "$veth" scope link
}

systemctl stop nodeproxy np-pod-web 2>/dev/null || true
sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
pod client "10.244.$index.10"
pod web "10.244.$index.20"
for peer in $(seq 1 "$count"); do
    if [[ $peer != "$index" ]]; then
        ip route replace "10.244.$peer.0/24" via "192.168.56.1$peer"
    fi
done

endpoints=""
for peer in $(seq 1 "$count"); do
    endpoints+="      - {address: 10.244.$peer.20, node: node-$peer}"$'\n'
done
install -d -m 0755 /etc/nodeproxy
cat > /etc/nodeproxy/config.yaml <<EOF
# Written by vagrant/node.sh; push changes with \`nodeproxy ctl config apply\` or edit and reload.
node:
  name: node-$index
capture:
  pod_cidrs: [10.244.$index.0/24]
  pod_interfaces: ["npv+"]
listeners:
  outbound: 127.0.0.1:15001
services:
  - name: web
    vip: 10.96.0.10
    ports: [{port: 80, target_port: 8080}]
    balancer: p2c
    endpoints:
$endpoints  - name: echo
    vip: 10.96.0.11
    ports: [{port: 9000}]
    balancer: least_conn
    endpoints:
$endpoints
EOF
rm -f /etc/nodeproxy/config.yaml.pushed  # the file just written is what this node runs
nodeproxy check-config /etc/nodeproxy/config.yaml

systemd-run --unit np-pod-web --collect --property=Restart=on-failure \
    ip netns exec web "$(command -v python3)" -m nodeproxy.lab_backend --name "node-$index-web"

install -m 0644 "$repo/systemd/nodeproxy.service" /etc/systemd/system/nodeproxy.service
install -d -m 0755 /etc/systemd/system/nodeproxy.service.d
cat > /etc/systemd/system/nodeproxy.service.d/vagrant.conf <<EOF
# The vagrant user may run \`nodeproxy ctl\` (the admin socket is 0660, group vagrant).
[Service]
Environment=NODEPROXY_OPTS=--admin-group=vagrant
EOF
[[ -x /usr/local/bin/nodeproxy ]] || ln -sf "$(command -v nodeproxy)" /usr/local/bin/nodeproxy
systemctl daemon-reload
systemctl enable nodeproxy
systemctl restart nodeproxy
systemctl is-active nodeproxy
