// A Java mTLS client of a pki-agent credential: the PKCS#12 keystore the agent writes
// (pkcs12: {password_file: ...}) as its key and certificate, ca.pem as its trust anchor.
//
// Run it as a single file, no build tool: java MtlsClient.java KEYSTORE PASSWORD_FILE CA_PEM HOST PORT
// It prints the server's subject and serial number and exits 0, or prints the error and exits 1.

import java.io.FileInputStream;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;

public class MtlsClient {
    public static void main(String[] args) throws Exception {
        try {
            run(args[0], Path.of(args[1]), args[2], args[3], Integer.parseInt(args[4]));
        } catch (Exception e) {
            System.out.println("error: " + e);
            System.exit(1);
        }
    }

    static void run(String keystorePath, Path passwordFile, String caPem, String host, int port) throws Exception {
        // The password file holds one line; its line ending is not part of the password.
        char[] password = Files.readString(passwordFile, StandardCharsets.UTF_8).replaceAll("\r?\n$", "").toCharArray();
        KeyStore keystore = KeyStore.getInstance("PKCS12");
        try (InputStream in = new FileInputStream(keystorePath)) {
            keystore.load(in, password);
        }
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(keystore, password);

        // The trust anchor from ca.pem, in an in-memory truststore (keytool -importcert makes a file of it).
        KeyStore truststore = KeyStore.getInstance("PKCS12");
        truststore.load(null, null);
        int n = 0;
        try (InputStream in = new FileInputStream(caPem)) {
            for (Certificate anchor : CertificateFactory.getInstance("X.509").generateCertificates(in)) {
                truststore.setCertificateEntry("anchor-" + n++, anchor);
            }
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(truststore);

        SSLContext context = SSLContext.getInstance("TLS");
        context.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
        try (SSLSocket socket = (SSLSocket) context.getSocketFactory().createSocket(host, port)) {
            SSLParameters params = socket.getSSLParameters();
            params.setEndpointIdentificationAlgorithm("HTTPS");  // check the server's name or IP address (RFC 6125)
            socket.setSSLParameters(params);
            socket.setSoTimeout(10000);
            socket.startHandshake();
            // With TLS 1.3 a server refusing our certificate says so after the handshake: read its answer.
            int first = socket.getInputStream().read();
            if (first < 0) {
                throw new java.io.EOFException("the server closed the connection");
            }
            X509Certificate peer = (X509Certificate) socket.getSession().getPeerCertificates()[0];
            System.out.println("peer: " + peer.getSubjectX500Principal().getName() + " serial " + peer.getSerialNumber().toString(16));
        }
    }
}
