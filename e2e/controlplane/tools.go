//go:build tools

// Package controlplane pins the upstream binaries scripts/dev e2e builds:
//
//	go build -o BIN k8s.io/kubernetes/cmd/kube-apiserver
//	go build -o BIN k8s.io/kubernetes/cmd/kube-controller-manager
//	go build -o BIN k8s.io/kubernetes/cmd/kube-scheduler
//	go build -o BIN k8s.io/kubernetes/cmd/kubelet
//	go build -o BIN k8s.io/kubernetes/cmd/kube-proxy
//	go build -o BIN go.etcd.io/etcd/server/v3   (etcd, at the version the kubernetes module uses)
package controlplane

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"

	_ "go.etcd.io/etcd/server/v3"
)
