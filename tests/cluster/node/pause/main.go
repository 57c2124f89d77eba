// pause: the process of the locally built pod sandbox image and of the test image.
//
// Without flags it sleeps until SIGTERM or SIGINT and exits 0, reaping children meanwhile
// (it is PID 1 of the sandbox). Flags, for the test container:
//
//	-report       print one line describing the process's privileges (uid, gid, CapEff,
//	              NoNewPrivs, Seccomp, whether / is writable) before sleeping
//	-ignore-term  ignore SIGTERM, so only SIGKILL ends it (the pod stays Terminating for
//	              its whole grace period)
//	-apiserver    ask the apiserver who this pod is, the way in-cluster clients connect
//	              (KUBERNETES_SERVICE_HOST/PORT, the service account's CA and token), and
//	              print "apiserver: <HTTP status> <user name>" or "apiserver: error ..."
//	-dial ADDR    open a TCP connection to ADDR once; print "dial ADDR: ok" or the error
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	report := flag.Bool("report", false, "print the process's privileges once")
	ignoreTerm := flag.Bool("ignore-term", false, "ignore SIGTERM")
	apiserver := flag.Bool("apiserver", false, "ask the apiserver who this pod is")
	dial := flag.String("dial", "", "open a TCP connection to this address once")
	flag.Parse()

	if *report {
		fmt.Println(privileges())
	}
	if *apiserver {
		fmt.Println("apiserver:", whoami())
	}
	if *dial != "" {
		result := "ok"
		if c, err := net.DialTimeout("tcp", *dial, 5*time.Second); err != nil {
			result = err.Error()
		} else {
			c.Close()
		}
		fmt.Printf("dial %s: %s\n", *dial, result)
	}
	stop := make(chan os.Signal, 1)
	children := make(chan os.Signal, 1)
	signal.Notify(children, syscall.SIGCHLD)
	if *ignoreTerm {
		signal.Ignore(syscall.SIGTERM)
		signal.Notify(stop, syscall.SIGINT)
	} else {
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	}
	for {
		select {
		case <-children:
			reap()
		case s := <-stop:
			fmt.Printf("pause: %v, exiting\n", s)
			os.Exit(0)
		}
	}
}

// reap collects every exited child, so that orphans adopted by PID 1 do not stay zombies.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}

// privileges: "uid=U gid=G CapEff=X NoNewPrivs=N Seccomp=S rootfs=read-only|writable".
func privileges() string {
	fields := map[string]string{}
	if f, err := os.Open("/proc/self/status"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			k, v, ok := strings.Cut(s.Text(), ":")
			if ok {
				fields[k] = strings.TrimSpace(v)
			}
		}
		f.Close()
	}
	rootfs := "writable"
	if f, err := os.Create("/.pause-probe"); err != nil {
		rootfs = "read-only"
		if err.(*os.PathError).Err != syscall.EROFS {
			rootfs = "not-writable(" + err.Error() + ")"
		}
	} else {
		f.Close()
		os.Remove("/.pause-probe")
	}
	return fmt.Sprintf("uid=%d gid=%d CapEff=%s NoNewPrivs=%s Seccomp=%s rootfs=%s",
		os.Getuid(), os.Getgid(), fields["CapEff"], fields["NoNewPrivs"], fields["Seccomp"], rootfs)
}

// whoami: a SelfSubjectReview through the kubernetes Service, as an in-cluster client
// does it (server certificate checked against the service account's CA).
func whoami() string {
	const sa = "/var/run/secrets/kubernetes.io/serviceaccount/"
	ca, err := os.ReadFile(sa + "ca.crt")
	if err != nil {
		return "error " + err.Error()
	}
	token, err := os.ReadFile(sa + "token")
	if err != nil {
		return "error " + err.Error()
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return "error: no certificate in " + sa + "ca.crt"
	}
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	url := "https://" + net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")) +
		"/apis/authentication.k8s.io/v1/selfsubjectreviews"
	body := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`)
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return "error " + err.Error()
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := client.Do(req)
	if err != nil {
		return "error " + err.Error()
	}
	defer resp.Body.Close()
	var review struct {
		Status struct {
			UserInfo struct {
				Username string `json:"username"`
			} `json:"userInfo"`
		} `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&review); err != nil {
		return fmt.Sprintf("%d error decoding the answer: %v", resp.StatusCode, err)
	}
	return fmt.Sprintf("%d %s", resp.StatusCode, review.Status.UserInfo.Username)
}
