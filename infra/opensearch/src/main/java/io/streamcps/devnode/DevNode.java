package io.streamcps.devnode;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.http.HttpServerTransport;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

/**
 * Runs one OpenSearch 2.19 node in this JVM, for development and tests.
 *
 * <p>We have neither Docker nor the OpenSearch tarball, only Maven Central, so the
 * node is built from the server jar plus the Netty4 transport plugin, which is
 * handed to {@link Node} as a classpath plugin instead of being installed under
 * {@code plugins/}. There is no security plugin, no bootstrap checks (those run
 * only from OpenSearch's own {@code Bootstrap}) and no security manager.
 *
 * <p>Usage: {@code DevNode <workdir> <httpPort> <transportPort>}; each argument
 * may instead come from the system properties {@code devnode.dir},
 * {@code devnode.http.port} and {@code devnode.transport.port}. Data, logs and
 * config live under the work dir, so a restart on the same dir keeps the data.
 * The process runs until it is killed; SIGTERM closes the node cleanly.
 */
public final class DevNode {

    private DevNode() {}

    /** A Node with plugins taken from the classpath (the constructor is protected). */
    static final class ClasspathNode extends Node {
        ClasspathNode(Environment environment, List<Class<? extends Plugin>> plugins) {
            super(environment, plugins, true);
        }
    }

    public static void main(String[] args) throws Exception {
        Path workDir = Paths.get(arg(args, 0, "devnode.dir", null)).toAbsolutePath().normalize();
        int httpPort = Integer.parseInt(arg(args, 1, "devnode.http.port", "9200"));
        int transportPort = Integer.parseInt(arg(args, 2, "devnode.transport.port", "9300"));

        Path home = workDir.resolve("home");
        Path config = home.resolve("config");
        Path logs = workDir.resolve("logs");
        for (Path dir : List.of(config, home.resolve("plugins"), home.resolve("modules"), logs, workDir.resolve("data"))) {
            Files.createDirectories(dir);
        }
        // Must be set before the first logger exists: log4j2.xml writes to ${sys:devnode.logs},
        // and log4j must not stop before the node has finished closing.
        System.setProperty("devnode.logs", logs.toString());
        System.setProperty("log4j.shutdownHookEnabled", "false");
        System.setProperty("log4j2.disable.jmx", "true");

        Settings settings = Settings.builder()
            .put("cluster.name", "stream-cps-dev")
            .put("node.name", "devnode")
            .put("path.home", home.toString())
            .put("path.data", workDir.resolve("data").toString())
            .put("path.logs", logs.toString())
            .put("network.host", "127.0.0.1")
            .put("http.port", httpPort)
            .put("transport.port", transportPort)
            .put("discovery.type", "single-node")
            // A dev box's disk may be fuller than the production watermarks allow.
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            // With a small heap the real-memory breaker trips on garbage not yet collected.
            .put("indices.breaker.total.use_real_memory", false)
            .build();
        Environment environment = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), config, () -> "devnode");

        Thread.setDefaultUncaughtExceptionHandler((thread, error) -> {
            System.err.println("uncaught exception in thread " + thread.getName());
            error.printStackTrace();
            if (error instanceof Error) {
                Runtime.getRuntime().halt(1); // e.g. OutOfMemoryError: the node state is unknown
            }
        });

        Node node = new ClasspathNode(environment, List.of(Netty4Plugin.class));
        CountDownLatch closed = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> close(node, closed), "devnode-shutdown"));
        try {
            node.start();
        } catch (Exception | Error e) {
            System.err.println("devnode: failed to start: " + e);
            e.printStackTrace();
            System.exit(1);
        }
        HttpServerTransport http = node.injector().getInstance(HttpServerTransport.class);
        System.out.println("devnode: started, http " + http.boundAddress().publishAddress() + ", data " + workDir.resolve("data"));
        System.out.flush();
        closed.await(); // node threads are daemons: keep the JVM alive until the hook has run
    }

    private static void close(Node node, CountDownLatch closed) {
        try {
            node.close();
            if (!node.awaitClose(30, TimeUnit.SECONDS)) {
                System.err.println("devnode: node did not close within 30s");
            }
            System.out.println("devnode: stopped");
        } catch (IOException | RuntimeException e) {
            System.err.println("devnode: error while closing: " + e);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        } finally {
            org.apache.logging.log4j.LogManager.shutdown();
            closed.countDown();
        }
    }

    private static String arg(String[] args, int index, String property, String fallback) {
        String value = args.length > index ? args[index] : System.getProperty(property, fallback);
        if (value == null) {
            System.err.println("usage: DevNode <workdir> <httpPort> <transportPort> (or -D" + property + "=...)");
            System.exit(2);
        }
        return value;
    }
}
