// SPDX-License-Identifier: MIT OR GPL-2.0-only
//
// Custody node agent: sees every connect() from the cgroups it is attached
// to, reports each to userspace through a ring buffer, and refuses those
// whose destination the egress policy blocks (the caller gets EPERM).
//
// Deny entries live in longest-prefix-match tries keyed by (port, address),
// port first: a blocked network on one port is the key (port, net) with
// prefix 16 + bits; a network blocked on every port is stored with port 0
// and looked up a second time with port 0.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

#define VERDICT_ALLOW 1
#define VERDICT_BLOCK 3

// Sized to a multiple of 4 so the key has no padding the kernel would
// count: port (network order), address (network order), then zeros.
struct deny4_key {
	__u32 prefixlen;
	__u8 data[8];
};

struct deny6_key {
	__u32 prefixlen;
	__u8 data[20];
};

// Must match `ConnectEvent` in src/event.rs.
struct connect_event {
	__u64 cgroup_id;
	__u64 ktime_ns;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u16 family;
	__u16 port; // host order
	__u8 addr[16]; // IPv4 in the first 4 bytes
	__u32 rule; // id of the deny entry that matched, 0 if none
	__u8 verdict;
	__u8 protocol;
	__u8 comm[16];
	__u8 _pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__type(key, struct deny4_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} DENY4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__type(key, struct deny6_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} DENY6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} EVENTS SEC(".maps");

// Index 0: events dropped because the ring buffer was full.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} DROPPED SEC(".maps");

static __always_inline void report(struct bpf_sock_addr *ctx, __u16 family, const __u8 *addr,
				   int addr_len, __u32 rule, __u8 verdict)
{
	struct connect_event *e = bpf_ringbuf_reserve(&EVENTS, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *dropped = bpf_map_lookup_elem(&DROPPED, &zero);
		if (dropped)
			*dropped += 1;
		return;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ktime_ns = bpf_ktime_get_ns();
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->family = family;
	e->port = bpf_ntohs((__u16)ctx->user_port);
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	if (addr_len == 4)
		__builtin_memcpy(e->addr, addr, 4);
	else
		__builtin_memcpy(e->addr, addr, 16);
	e->rule = rule;
	e->verdict = verdict;
	e->protocol = (__u8)ctx->protocol;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->_pad[0] = 0;
	e->_pad[1] = 0;
	bpf_ringbuf_submit(e, 0);
}

SEC("cgroup/connect4")
int custody_connect4(struct bpf_sock_addr *ctx)
{
	struct deny4_key key = { .prefixlen = 48, .data = { 0 } };
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	__builtin_memcpy(key.data, &port, 2);
	__builtin_memcpy(key.data + 2, &ip, 4);

	__u32 *rule = bpf_map_lookup_elem(&DENY4, &key);
	if (!rule) {
		__builtin_memset(key.data, 0, 2);
		rule = bpf_map_lookup_elem(&DENY4, &key);
	}
	__u32 matched = rule ? *rule : 0;
	report(ctx, AF_INET, (const __u8 *)&ip, 4, matched, rule ? VERDICT_BLOCK : VERDICT_ALLOW);
	return rule ? 0 : 1;
}

SEC("cgroup/connect6")
int custody_connect6(struct bpf_sock_addr *ctx)
{
	struct deny6_key key = { .prefixlen = 144, .data = { 0 } };
	__u32 ip[4];
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	__u16 port = (__u16)ctx->user_port;
	__builtin_memcpy(key.data, &port, 2);
	__builtin_memcpy(key.data + 2, ip, 16);

	__u32 *rule = bpf_map_lookup_elem(&DENY6, &key);
	if (!rule) {
		__builtin_memset(key.data, 0, 2);
		rule = bpf_map_lookup_elem(&DENY6, &key);
	}
	__u32 matched = rule ? *rule : 0;
	report(ctx, AF_INET6, (const __u8 *)ip, 16, matched, rule ? VERDICT_BLOCK : VERDICT_ALLOW);
	return rule ? 0 : 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
