# The pod sandbox's image: the pause program of the pinned kubernetes module (build/pause,
# built static by e2e/node/node.sh), as upstream's own image packages it.
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
