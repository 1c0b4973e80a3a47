// goproxy is the classic Go TCP proxy, the baseline bench/run.py compares against: the
// standard library's net package, one goroutine pair per connection, io.Copy each way.
//
//	go build -o goproxy bench/peers/goproxy.go
//	./goproxy -listen 127.0.0.1:9000 -upstream 127.0.0.1:8080 [-copy buffer]
//
// Nothing is tuned: GOMAXPROCS is Go's default (the number of CPUs), Go sets TCP_NODELAY on
// every TCP connection by default, and io.Copy between two *net.TCPConn uses splice(2) on
// Linux. Half-close is propagated (CloseWrite) so a client that shuts down its write side
// still gets the whole reply.
//
// Go's splice holds a pipe (two fds) per direction for the whole life of a connection, so
// a connection costs 6 fds, as in our proxy's copy = splice. For the many-connections memory
// test (4000 connections under a 20000-fd limit) -copy buffer hides the splice path and
// io.Copy moves bytes through its own 32 KiB buffer instead, like our copy = buffer.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "host:port to accept clients on")
	upstream := flag.String("upstream", "", "host:port to relay every connection to")
	mode := flag.String("copy", "splice", "splice: plain io.Copy (splice(2) on Linux) | "+
		"buffer: io.Copy through a 32 KiB buffer")
	flag.Parse()
	buffered := *mode == "buffer"
	if *upstream == "" {
		log.Fatal("goproxy: -upstream is required")
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintf(os.Stderr, "goproxy: listening on %s\n", ln.Addr())
	for {
		client, err := ln.Accept()
		if err != nil {
			// Out of fds or similar: say so, pause, and keep accepting.
			log.Print(err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go relay(client.(*net.TCPConn), *upstream, buffered)
	}
}

// relay connects to the upstream and copies bytes both ways until both directions end.
func relay(client *net.TCPConn, upstream string, buffered bool) {
	defer client.Close()
	conn, err := net.Dial("tcp", upstream)
	if err != nil {
		log.Print(err)
		return
	}
	server := conn.(*net.TCPConn)
	defer server.Close()

	done := make(chan struct{})
	go func() {
		copyBytes(server, client, buffered) // client -> upstream
		server.CloseWrite()
		close(done)
	}()
	copyBytes(client, server, buffered) // upstream -> client
	client.CloseWrite()
	<-done
}

// copyBytes is io.Copy; with buffered, both ends are wrapped so that io.Copy cannot see
// their ReadFrom/WriteTo methods and copies through its own 32 KiB buffer.
func copyBytes(dst, src *net.TCPConn, buffered bool) {
	if buffered {
		io.Copy(struct{ io.Writer }{dst}, struct{ io.Reader }{src})
	} else {
		io.Copy(dst, src)
	}
}
