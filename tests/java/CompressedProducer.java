// A producer that is not kafka-python: Apache Kafka's Java client, as photo services' own producers
// are. Reads "topic<TAB>base64 key<TAB>base64 value" lines from standard input and sends them with
// compression.type = the codec given, idempotent, acks=all. Run as a single source file (Java 11+):
//   java -cp "KAFKA_LIBS/*" tests/java/CompressedProducer.java HOST:PORT CODEC < records.tsv
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.Future;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class CompressedProducer {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        props.put("compression.type", args[1]);
        props.put("acks", "all");
        props.put("linger.ms", "20");  // batches of several records: what a codec compresses together
        props.put("key.serializer", ByteArraySerializer.class.getName());
        props.put("value.serializer", ByteArraySerializer.class.getName());
        Base64.Decoder b64 = Base64.getDecoder();
        List<Future<RecordMetadata>> sent = new ArrayList<>();
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(props);
             BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
            for (String line; (line = in.readLine()) != null; ) {
                String[] f = line.split("\t", -1);
                sent.add(producer.send(new ProducerRecord<>(f[0], b64.decode(f[1]), b64.decode(f[2]))));
            }
            producer.flush();
            for (Future<RecordMetadata> f : sent) {
                f.get();  // every record acknowledged, or this fails
            }
        }
        System.out.println(sent.size() + " records sent with " + args[1]);
    }
}
